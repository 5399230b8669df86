"""Atomic writes with per-process temporary names (rcm.checkpoint.atomic), tried with real processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rcm.checkpoint.atomic import (
    AtomicWriteError,
    atomic_write_bytes,
    atomic_write_with,
    is_own_temporary,
    remove_dead_temporaries,
    remove_own_temporaries,
    temporary_path,
)

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# A process that starts an atomic write into argv[1], announces its temporary name, and keeps writing until
# argv[2] exists (then finishes the write normally).
SLOW_WRITER = """
    import sys, time
    from pathlib import Path
    from rcm.checkpoint.atomic import atomic_write_with
    target, release = Path(sys.argv[1]), Path(sys.argv[2])
    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"first half,")
            f.flush()
            print(tmp.name, flush=True)
            while not release.exists():
                time.sleep(0.02)
            f.write(b"second half")
    atomic_write_with(target, writer)
    print("done", flush=True)
"""


def test_atomic_write_bytes_replaces_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_temporary_names_are_unique_and_name_this_process(tmp_path):
    names = {temporary_path(tmp_path / "step.pt").name for _ in range(200)}
    assert len(names) == 200
    name = next(iter(names))
    assert name.startswith(".step.pt.tmp-") and f"-{os.getpid()}-" in name
    assert is_own_temporary(tmp_path / name)
    assert not is_own_temporary(tmp_path / "step.pt") and not is_own_temporary(tmp_path / ".step.pt.tmp123")
    assert len(temporary_path(tmp_path / ("x" * 250)).name.encode()) < 255


def _child_temporary(folder, queue):
    queue.put(temporary_path(Path(folder) / "f").name)


def test_forked_child_gets_its_own_token(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_temporary, args=(str(tmp_path), queue))
    child.start()
    name = queue.get(timeout=30)
    child.join(30)
    assert not is_own_temporary(tmp_path / name)  # the parent must never clean a forked child's write


def test_errors_name_the_output_path_not_the_temporary(tmp_path):
    target = tmp_path / "model.safetensors"

    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(AtomicWriteError) as info:
        atomic_write_with(target, full_disk)
    message = str(info.value)
    assert str(target) in message and "No space left" in message and ".tmp-" not in message
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # the partial temporary is gone

    def refers_to_temporary(tmp: Path) -> None:
        raise RuntimeError(f"serialising into {tmp} failed")

    with pytest.raises(AtomicWriteError, match="serialising into .*model.safetensors failed") as info:
        atomic_write_with(target, refers_to_temporary)
    assert ".tmp-" not in str(info.value)

    with pytest.raises(TypeError, match="cannot pickle"):  # the writer's own error passes through unchanged
        atomic_write_with(target, lambda tmp: (_ for _ in ()).throw(TypeError("cannot pickle 'lock'")))
    with pytest.raises(ValueError, match=f"cannot write {target}: the writer created no file"):
        atomic_write_with(target, lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_folder_target_and_missing_parent_are_value_errors(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=f"cannot write {tmp_path / 'out'}: it is a folder"):
        atomic_write_bytes(tmp_path / "out", b"x")
    with pytest.raises(ValueError, match=f"its folder {tmp_path / 'missing'} does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "f.json", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def test_a_writer_may_create_a_folder(tmp_path):
    def write_folder(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / ".metadata").write_bytes(b"m")
        (tmp / "__0_0.distcp").write_bytes(b"shard")

    atomic_write_with(tmp_path / "step_00000001", write_folder)
    assert sorted(p.name for p in (tmp_path / "step_00000001").iterdir()) == [".metadata", "__0_0.distcp"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]


def test_cleanup_spares_another_live_process_write_in_progress(tmp_path):
    """The issue's bug: a run deleted another process's temporary mid-write. Now that write completes."""
    target, release = tmp_path / "step_00000002.pt", tmp_path / "release"
    writer = _python(SLOW_WRITER, str(target), str(release))
    foreign = tmp_path / writer.stdout.readline().strip()
    assert foreign.is_file() and not is_own_temporary(foreign)
    own = temporary_path(tmp_path / "step_00000003.pt")
    own.write_bytes(b"left over by this process")
    assert remove_own_temporaries(tmp_path) == [own]
    assert remove_dead_temporaries(tmp_path) == []  # the writer is alive: its temporary stays
    assert foreign.is_file()
    release.touch()
    assert writer.stdout.readline().strip() == "done", writer.communicate()[1]
    assert writer.wait(30) == 0
    assert target.read_bytes() == b"first half,second half"


def test_a_killed_write_leaves_the_old_content_and_its_leftover_is_removed_once_dead(tmp_path):
    target, release = tmp_path / "latest", tmp_path / "release"
    atomic_write_bytes(target, b"step_00000001.pt")
    writer = _python(SLOW_WRITER, str(target), str(release))
    leftover = tmp_path / writer.stdout.readline().strip()
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    assert target.read_bytes() == b"step_00000001.pt" and leftover.is_file()
    assert remove_own_temporaries(tmp_path) == []  # not this process's
    assert remove_dead_temporaries(tmp_path) == [leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_temporaries_of_another_host_are_never_removed(tmp_path):
    other_host = tmp_path / ".step.pt.tmp-00000000-999999-0123abcd-abcdef"  # host hash 0: not this host
    other_host.write_bytes(b"x")
    start = time.time()
    assert remove_dead_temporaries(tmp_path) == [] and other_host.is_file()
    assert time.time() - start < 5
