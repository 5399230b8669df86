"""Every command that writes a folder or a file claims it first (rcm.checkpoint.run_folder, issue 17):
a second process exits 2 at once naming the holder, a SIGKILLed holder's lock is taken over, and a
folder that is not the command's own (someone's files, the current directory, another command's
folder) is refused before anything is written. `rcm distill` itself: tests/test_run_folder.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rcm import cli
from rcm.checkpoint.lock import LOCK_NAME, RunFolderLock
from rcm.checkpoint.run_folder import RUN_MARKER, claim_file, claim_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# Claims argv[1] as a folder of kind argv[2] (or as one output file: kind "file"), says so, then waits.
HOLDER = """
    import sys, time
    from rcm.checkpoint.run_folder import claim_file, claim_folder
    lock = claim_file(sys.argv[1], "out") if sys.argv[2] == "file" else claim_folder(sys.argv[1], sys.argv[2])
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(target: Path, kind: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(target), kind], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held", holder.communicate()[1]
    return holder


def _end(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(30)


def _user_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def _inputs(tmp: Path) -> dict[str, Path]:
    """Files that get each command past its checks up to its claim (their content is never read before it)."""
    tmp.mkdir(parents=True, exist_ok=True)
    run = tmp / "finished_run"
    run.mkdir(exist_ok=True)
    (run / "student_ema.safetensors").write_bytes(b"")
    for name in ("prompts.txt", "teacher.safetensors", "checkpoint.pt"):
        (tmp / name).write_bytes(b"")
    (tmp / "umt5").mkdir(exist_ok=True)
    return {"run": run, "prompts": tmp / "prompts.txt", "teacher": tmp / "teacher.safetensors",
            "umt5": tmp / "umt5", "checkpoint": tmp / "checkpoint.pt"}


# command → (its argv writing to {out}, what it claims: a folder kind or "file", the flag of {out})
COMMANDS = {
    "distill": (["distill", "--out-dir", "{out}"], "distill", "--out-dir"),
    "train-teacher": (["train-teacher", "--out-dir", "{out}", "--device", "cpu"], "train-teacher", "--out-dir"),
    "train-teacher --export": (["train-teacher", "--out-dir", "{tmp}/new", "--export", "{out}", "--device", "cpu"],
                               "file", "--export"),
    "train-i2v-teacher": (["train-i2v-teacher", "--out", "{out}"], "file", "--out"),
    "train-classifier": (["train-classifier", "--out", "{out}"], "file", "--out"),
    "eval": (["eval", "--runs", "{run}", "--out-dir", "{out}", "--device", "cpu"], "eval", "--out-dir"),
    "study": (["study", "--out-dir", "{out}", "--device", "cpu"], "study", "--out-dir"),
    "synth": (["synth", "--prompts", "{prompts}", "--teacher", "{teacher}", "--text-encoder-path", "{umt5}",
               "--out-dir", "{out}", "--device", "cpu"], "synth", "--out-dir"),
    "export": (["export", "--checkpoint", "{checkpoint}", "--out", "{out}"], "file", "--out"),
}


def _argv(command: str, out: Path | str, tmp: Path) -> list[str]:
    names = {k: str(v) for k, v in _inputs(tmp).items()} | {"out": str(out), "tmp": str(tmp)}
    return [a.format(**names) for a in COMMANDS[command][0]]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_claimed_output_is_refused_at_once_naming_the_holder(command, tmp_path, capsys):
    kind = COMMANDS[command][1]
    out = tmp_path / ("out.safetensors" if kind == "file" else "out")
    holder = _hold(out, kind)
    try:
        before = _tree(tmp_path / "out") if kind != "file" else None
        start = time.monotonic()
        err = _user_error(_argv(command, out, tmp_path / "in"), capsys)
        assert time.monotonic() - start < 20
        assert f"is in use by another run (pid {holder.pid} on " in err and "command: -c" in err, err
        assert COMMANDS[command][2] in err  # which flag picks another place
        if kind == "file":
            assert not out.exists() and f"output {out}" in err
        else:
            assert _tree(out) == before and f"run folder {out}" in err  # nothing written
    finally:
        _end(holder)


@pytest.mark.parametrize("command", [c for c, (_, kind, _) in COMMANDS.items() if kind != "file"])
def test_someone_elses_folder_is_refused_before_any_write(command, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    err = _user_error(_argv(command, out, tmp_path / "in"), capsys)
    assert err.startswith("rcm: error: --out-dir: ") and "notes.txt" in err, err
    assert _tree(out) == {"notes.txt": b"mine\n"}


@pytest.mark.parametrize("command", [c for c, (_, kind, _) in COMMANDS.items() if kind != "file"])
def test_the_current_directory_is_not_an_output_folder(command, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    err = _user_error(_argv(command, "", tmp_path / "in"), capsys)
    assert "--out-dir: must name a folder" in err, err
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("command", ["train-i2v-teacher", "train-classifier", "export"])
def test_a_folder_or_nothing_as_an_output_file_is_refused(command, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    err = _user_error(_argv(command, tmp_path / "folder", tmp_path / "in"), capsys)
    assert "--out: " in err and "is a folder" in err, err
    assert list((tmp_path / "folder").iterdir()) == []
    assert "--out: must name a file" in _user_error(_argv(command, "", tmp_path / "in"), capsys)


def test_another_commands_folder_is_refused(tmp_path, capsys):
    claim_folder(tmp_path / "teacher", "train-teacher").release()
    err = _user_error(_argv("eval", tmp_path / "teacher", tmp_path / "in"), capsys)
    assert "--out-dir: " in err and "is an `rcm train-teacher` folder, not an `rcm eval` one" in err, err


def test_an_output_file_inside_a_run_folder_takes_the_run_folders_lock(tmp_path):
    run = tmp_path / "run"
    with RunFolderLock(run):  # a run is writing its folder: no one else writes into it
        with pytest.raises(ValueError, match=f"run folder {run} is already locked"):
            claim_file(run / "student.safetensors", "out")
    claim_folder(run, "distill").release()
    lock = claim_file(run / "student.safetensors", "out")
    assert lock.path == run / LOCK_NAME
    lock.release()
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER, LOCK_NAME]


def test_a_lone_output_files_lock_is_removed_on_release_and_taken_over_from_a_dead_holder(tmp_path):
    target = tmp_path / "w.safetensors"
    lock = claim_file(target, "out")
    assert lock.path == tmp_path / ".w.safetensors.rcm.lock"
    with pytest.raises(ValueError, match=f"output {target} is already locked by this process"):
        claim_file(target, "out")
    lock.release()
    assert list(tmp_path.iterdir()) == []  # nothing left beside the output
    holder = _hold(target, "file")
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert (tmp_path / ".w.safetensors.rcm.lock").is_file()  # a killed holder leaves its lock file ...
    claim_file(target, "out").release()  # ... which the next claim takes over and removes
    assert list(tmp_path.iterdir()) == []


# -- two real `rcm train-teacher` processes on one folder ------------------------------------------------

def _teacher_args(out: Path) -> list[str]:
    return ["train-teacher", "--out-dir", str(out), "--model", "digits-dit-tiny", "--steps", "12", "--batch-size",
            "2", "--warmup", "2", "--checkpoint-every", "4", "--log-every", "1", "--threads", "1", "--device", "cpu"]


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rcm", *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.stat().st_size > 0):
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lone_teacher(tmp_path_factory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("lone") / "t"
    cli.main(_teacher_args(out))
    return load_file(out / "teacher.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_train_teacher_exits_2_and_the_first_equals_a_lone_run(lone_teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "t"
    first = _start(_teacher_args(out))
    _wait_for(out / "log.jsonl", first)  # it holds the folder and trains ...
    first.send_signal(signal.SIGSTOP)  # ... and stays in the middle of it, however slow the second's start
    try:
        start = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "rcm", *_teacher_args(out)], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stdout + second.stderr
        assert time.monotonic() - start < 30
        message = second.stderr.strip()
        assert "\n" not in message and f"run folder {out} is in use by another run (pid {first.pid} " in message
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(300) == 0, first.stdout.read().decode()[-3000:]
    assert _same(load_file(out / "teacher.safetensors"), lone_teacher)


def test_a_sigkilled_train_teacher_is_taken_over_and_resumed_exactly(lone_teacher, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "t"
    first = _start(_teacher_args(out))
    _wait_for(out / "checkpoints" / "latest", first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert not (out / "teacher.safetensors").exists()
    cli.main(_teacher_args(out))  # the dead run's lock is taken over; the run resumes from its checkpoint
    assert _same(load_file(out / "teacher.safetensors"), lone_teacher)


# -- two real `rcm study` processes on one folder ------------------------------------------------------

def test_a_second_study_exits_2_and_the_first_finishes(tmp_path):
    out = tmp_path / "study"
    argv = ["study", "--out-dir", str(out), "--methods", "scm", "--snapshots", "2", "--batch-size", "2",
            "--num-per-class", "2", "--num-real", "20", "--teacher-steps", "1", "--student-steps", "1",
            "--threads", "1", "--device", "cpu"]
    first = _start(argv)
    _wait_for(out / "scm" / "config.json", first)  # the study holds its folder and its method's run trains
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run([sys.executable, "-m", "rcm", *argv], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=120)
        message = second.stderr.strip()
        assert second.returncode == 2 and "\n" not in message, second.stdout + second.stderr
        assert f"run folder {out} is in use by another run (pid {first.pid} " in message, message
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(300) == 0, first.stdout.read().decode()[-3000:]
    assert (out / "study.json").is_file() and (out / "scm" / "student_ema.safetensors").is_file()


# -- a run removes only its own temporaries (and those of ended processes) -------------------------------

# Makes a temporary (rcm.checkpoint.atomic's name) in each folder given, prints them, then waits (argv[1] "wait") or exits.
TEMPORARIES = """
    import sys, time
    from pathlib import Path
    from rcm.checkpoint.atomic import temporary_path
    for folder in sys.argv[2:]:
        path = temporary_path(Path(folder) / "step_00000001.pt")
        path.write_bytes(b"a write in progress")
        print(path, flush=True)
    if sys.argv[1] == "wait":
        time.sleep(600)
"""


def test_a_run_removes_only_its_own_and_ended_processes_temporaries(tmp_path):
    out = tmp_path / "t"
    folders = [out, out / "checkpoints"]
    claim_folder(out, "train-teacher").release()
    folders[1].mkdir()
    argv = [sys.executable, "-c", textwrap.dedent(TEMPORARIES)]
    dead = subprocess.run([*argv, "exit", *map(str, folders)], env=ENV, capture_output=True, text=True, check=True)
    live = subprocess.Popen([*argv, "wait", *map(str, folders)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        live_paths = [Path(live.stdout.readline().strip()) for _ in folders]
        dead_paths = [Path(p) for p in dead.stdout.split()]
        assert all(p.is_file() for p in live_paths + dead_paths)
        args = _teacher_args(out)
        args[args.index("--steps") + 1], args[args.index("--checkpoint-every") + 1] = "2", "1"
        cli.main(args)  # claims the folder, saves two checkpoints
        assert all(p.is_file() for p in live_paths)  # another live process's writes are never touched
        assert not any(p.exists() for p in dead_paths)  # an ended process's leftovers are removed
        leftover = sorted(p.name for f in folders for p in f.iterdir() if ".tmp-" in p.name)
        assert leftover == sorted(p.name for p in live_paths)  # and none of this run's own
    finally:
        _end(live)
