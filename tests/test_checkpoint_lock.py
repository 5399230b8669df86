"""One writer per run folder (rcm.checkpoint.lock), tried with real processes: a busy folder, a SIGKILLed
holder, racing takeovers, a forked child that outlives its parent, a lock file removed by hand."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rcm.checkpoint.lock import (
    LOCK_NAME,
    RunFolderBusy,
    RunFolderLock,
    holder_running,
    read_holder,
)

ROOT = Path(__file__).resolve().parents[1]

# Locks argv[1] (exit 2 with the message on stderr if busy), prints "locked <pid>", then works until argv[2]
# exists, writes a result file and exits 0. With "fork" as argv[3] it first forks a child that keeps the lock.
RUN = """
    import os, sys, time
    from pathlib import Path
    from rcm.checkpoint.lock import RunFolderBusy, RunFolderLock
    folder, release = Path(sys.argv[1]), Path(sys.argv[2])
    go = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    while go is not None and not go.exists():
        time.sleep(0.001)
    try:
        lock = RunFolderLock(folder).acquire()
    except RunFolderBusy as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    if sys.argv[3] == "fork" and os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    print("locked", os.getpid(), flush=True)
    while not release.exists():
        time.sleep(0.02)
    (folder / f"result-{os.getpid()}").write_text("finished")
    lock.release()
"""


def _start(folder: Path, release: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(RUN), str(folder), str(release),
                             *(extra or ("plain",))], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_locked(process: subprocess.Popen) -> int:
    line = process.stdout.readline().split()
    assert line[:1] == ["locked"], process.communicate()[1]
    return int(line[1])


def test_second_process_fails_at_once_naming_the_holder_and_the_first_finishes(tmp_path):
    folder, release = tmp_path / "run", tmp_path / "release"
    first = _start(folder, release)
    first_pid = _wait_locked(first)
    start = time.monotonic()
    second = _start(folder, release)
    _, err = second.communicate(timeout=60)
    elapsed = time.monotonic() - start
    assert second.returncode == 2
    message = err.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in err
    assert f"run folder {folder} is in use by another run (pid {first_pid} on {socket.gethostname()}" in message
    assert "started 20" in message and "command: -c " in message and "use another --out-dir" in message
    assert elapsed < 15  # interpreter start included; the lock itself does not wait
    release.touch()
    assert first.wait(60) == 0
    assert [p.name for p in folder.iterdir() if p.name.startswith("result-")] == [f"result-{first_pid}"]
    with RunFolderLock(folder) as lock:  # free again once the first run ended
        assert lock.held and read_holder(folder)["pid"] == os.getpid()
    assert (folder / LOCK_NAME).read_text() == ""  # released: it describes no one


def test_lock_of_a_sigkilled_process_is_taken_over(tmp_path):
    folder, release = tmp_path / "run", tmp_path / "release"
    victim = _start(folder, release)
    victim_pid = _wait_locked(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    stale = read_holder(folder, wait_s=0)
    assert stale["pid"] == victim_pid and holder_running(stale) is False  # its description is left behind
    with RunFolderLock(folder):
        holder = read_holder(folder)
        assert holder["pid"] == os.getpid() and holder_running(holder) is True


@pytest.mark.parametrize("round_", range(3))
def test_racing_takeovers_of_a_stale_lock_exactly_one_wins(tmp_path, round_):
    folder, release, go = tmp_path / "run", tmp_path / "release", tmp_path / "go"
    victim = _start(folder, release)
    _wait_locked(victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    racers = [_start(folder, release, "plain", str(go)) for _ in range(4)]
    time.sleep(1.5)  # let every racer reach its start line
    go.touch()
    deadline = time.monotonic() + 60
    while sum(r.poll() == 2 for r in racers) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    losers = [r for r in racers if r.poll() == 2]
    winners = [r for r in racers if r.poll() is None]
    assert len(losers) == 3 and len(winners) == 1
    winner_pid = _wait_locked(winners[0])
    for loser in losers:
        assert f"pid {winner_pid} on" in loser.stderr.read()
    release.touch()
    assert winners[0].wait(60) == 0


def test_a_forked_child_keeps_the_lock_after_its_parent_dies_and_the_message_says_so(tmp_path):
    folder, release = tmp_path / "run", tmp_path / "release"
    parent = _start(folder, release, "fork")
    parent_pid = _wait_locked(parent)
    child_pids = [int(p) for p in Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()]
    parent.send_signal(signal.SIGKILL)
    parent.wait(30)
    try:
        with pytest.raises(RunFolderBusy, match=f"has ended \\(pid {parent_pid} .*a process it started"):
            RunFolderLock(folder).acquire()
    finally:
        for pid in child_pids:
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the orphan is reaped by init; then the lock is free
        try:
            RunFolderLock(folder).acquire().release()
            break
        except RunFolderBusy:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_two_locks_in_one_process_conflict_and_release_on_exit(tmp_path):
    with RunFolderLock(tmp_path / "run"), pytest.raises(RunFolderBusy, match="already locked by this process"):
        RunFolderLock(tmp_path / "run").acquire()
    with pytest.raises(RuntimeError), RunFolderLock(tmp_path / "run"):
        raise RuntimeError("a crash inside the run")
    RunFolderLock(tmp_path / "run").acquire().release()  # released by the failed block


def test_a_lock_file_removed_by_hand_is_detected(tmp_path):
    with RunFolderLock(tmp_path) as lock:
        lock.check()
        (tmp_path / LOCK_NAME).unlink()
        with pytest.raises(ValueError, match="was removed or replaced while this run held it"):
            lock.check()


def test_liveness_compares_start_time_not_only_the_process_id(tmp_path):
    with RunFolderLock(tmp_path):
        me = read_holder(tmp_path)
    assert holder_running(me) is True
    assert holder_running({**me, "start_ticks": me["start_ticks"] + 1}) is False  # a reused process id
    assert holder_running({**me, "boot_id": "another boot"}) is False
    assert holder_running({**me, "host": "elsewhere.invalid"}) is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert holder_running({**me, "pid": dead.pid}) is False
    assert json.loads(json.dumps(me)) == me and me["command"]
