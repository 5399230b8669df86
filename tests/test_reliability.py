"""Crash safety of a real `rcm distill` process (issue 8, acceptance 1 and 2).

A distillation run of a tiny random digits teacher (rCM with sCM, DMD and critic phases, a checkpoint
after every iteration) is killed with SIGKILL at random points, some inside a step and some inside a
checkpoint write, and re-run with the same command until it completes. It must end bit-identical to an
uninterrupted run (final train state and exported student), log the same loss values for every
iteration, and after every kill the checkpoints folder must hold a readable checkpoint named by `latest`.
Then: a kill during an export (the end-of-run student export, and `rcm export`) at every point of the atomic
write leaves no partial file under the target name, and the re-run's export equals an uninterrupted one's.
And: a run whose steps keep going non-finite stops with exit status 1, one line, and its checkpoints kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rcm.checkpoint import LATEST, list_checkpoints, load_file, load_latest

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 12
SEED = 8


def _command(teacher: Path, out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rcm", "distill", "--teacher", str(teacher), "--out-dir", str(out_dir),
            "--no-report", "--batch-size", "4", "--threads", "1",
            "--loop.iterations", str(ITERATIONS), "--loop.checkpoint-every", "1", "--loop.log-every", "1",
            "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2",
            "--loss.dmd.max-simulation-steps", "2"]  # fmt: skip


def _launch(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _temporaries(folder: Path, pid: int | None = None) -> list[str]:
    """Temporary files of checkpoint writes under way (or killed mid-way), of process `pid` or any."""
    # rcm.checkpoint.atomic's names: .<name>.tmp-<host>-<pid>-<token>-<random>
    pattern = re.compile(r"^\..*\.tmp-[0-9a-f]{8}-" + (r"\d+" if pid is None else str(pid)) + r"-[0-9a-f]{8}-[0-9a-f]{6}$")
    try:
        return sorted(n for n in os.listdir(folder) if pattern.match(n))
    except FileNotFoundError:
        return []


def _wait_for_training(proc: subprocess.Popen, log_path: Path, deadline: float) -> bool:
    """Until this process has logged an iteration; False if it exited first."""
    start_lines = _lines(log_path)
    while _lines(log_path) <= start_lines:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)
    return True


def _kill_in_step(proc: subprocess.Popen, delay: float) -> None:
    end = time.monotonic() + delay
    while time.monotonic() < end and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)


def _kill_in_write(proc: subprocess.Popen, ckpt_dir: Path, nth: int) -> None:
    """SIGKILL as soon as the `nth` (0-based) checkpoint write of this process is seen under way."""
    seen, writing = 0, False
    while proc.poll() is None:
        now_writing = bool(_temporaries(ckpt_dir, proc.pid))
        if now_writing and not writing:
            if seen == nth:
                os.kill(proc.pid, signal.SIGKILL)
                return
            seen += 1
        writing = now_writing
        time.sleep(0.0005)


def _check_latest(ckpt_dir: Path) -> int | None:
    """`load_latest` succeeds; `latest` names a complete, readable checkpoint, which `load_latest` returns
    (no fallback). Without a pointer (killed between the first checkpoint and its pointer) the newest
    complete checkpoint is used. Returns its iteration, None if there is no checkpoint yet."""
    found = load_latest(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        assert [p.name for p in list_checkpoints(ckpt_dir)] == ([found[1].name] if found else [])
        return None if found is None else found[0]["train"]["iteration"]
    name = pointer.read_text().strip()
    assert (ckpt_dir / name).is_file(), f"`latest` names {name}, which does not exist"
    assert found is not None and found[1].name == name, f"load_latest fell back from {name} to {found and found[1]}"
    iteration = found[0]["train"]["iteration"]
    assert name == f"step_{iteration:08d}.pt"
    return iteration


def _entries(path: Path) -> list[dict]:
    """log.jsonl without the timings."""
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in e.items() if k not in ("seconds", "seconds_per_iteration")} for e in entries]


def _assert_same(a, b, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from rcm.digits.model import build_model, save_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(build_model("digits-dit-tiny", seed=3), path, {"kind": "teacher"})
    return path


def test_sigkilled_distill_resumes_exactly(teacher, tmp_path):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    ckpt_dir, log_path = killed_dir / "checkpoints", killed_dir / "log.jsonl"
    output = tmp_path / "output.txt"
    straight = _launch(_command(teacher, straight_dir), tmp_path / "straight.txt")  # alongside the others

    # The kills, in a seeded random order: ("step", delay) kills `delay` seconds after the process logged
    # its first iteration, mostly inside a step; ("write", n) kills as soon as the n-th checkpoint write
    # of the process is seen under way. A kill is counted where it landed: inside a write if the write's
    # temporary file is left behind, else inside a step; one that missed its kind is retried (at most 3
    # retries in all). Each launch costs seconds of imports: few kills, placed so that every launch gets
    # a few iterations further.
    rng = random.Random(SEED)
    plan = [("step", rng.uniform(0.1, 0.8)), ("write", rng.randint(1, 4)), rng.choice(
        [("step", rng.uniform(0.1, 0.8)), ("write", rng.randint(1, 4))])]
    rng.shuffle(plan)
    kills = {"step": 0, "write": 0}
    extra_kills = 0
    iterations_after_kills = []
    deadline = time.monotonic() + 240
    while True:
        proc = _launch(_command(teacher, killed_dir), output)
        if not plan or not _wait_for_training(proc, log_path, deadline):
            assert proc.wait(timeout=120) == 0, output.read_text()[-3000:]
            break
        kind, parameter = plan.pop(0)
        if kind == "step":
            _kill_in_step(proc, parameter)
        else:
            _kill_in_write(proc, ckpt_dir, parameter)
        if proc.wait(timeout=60) == 0:  # it finished before the kill landed
            break
        assert proc.returncode == -signal.SIGKILL
        mid_write = bool(_temporaries(ckpt_dir, proc.pid))  # a write under way leaves its temporary file
        kills["write" if mid_write else "step"] += 1
        if (kind == "write") != mid_write and extra_kills < 3:  # it landed elsewhere: one more of its kind
            extra_kills += 1
            plan.insert(0, ("write", rng.randint(1, 2)) if kind == "write" else ("step", rng.uniform(0.1, 0.8)))
        iterations_after_kills.append(_check_latest(ckpt_dir))
    assert straight.wait(timeout=120) == 0, (tmp_path / "straight.txt").read_text()[-3000:]

    assert kills["write"] >= 1 and kills["step"] >= 1, f"kills: {kills}, iterations after them: {iterations_after_kills}"
    assert any(i is not None and 0 < i < ITERATIONS for i in iterations_after_kills), iterations_after_kills
    assert _check_latest(ckpt_dir) == ITERATIONS and not _temporaries(ckpt_dir)

    # The loss trajectory: every logged entry (a killed run may have logged iterations after its last
    # checkpoint; the resumed run repeats them) equals the uninterrupted run's entry of that iteration.
    reference = {e["iteration"]: e for e in _entries(straight_dir / "log.jsonl")}
    assert sorted(reference) == list(range(ITERATIONS))
    assert {e["phase"] for e in reference.values()} == {"student", "critic"}
    resumed = _entries(log_path)
    assert {e["iteration"] for e in resumed} == set(reference)
    for entry in resumed:
        assert entry == reference[entry["iteration"]], f"iteration {entry['iteration']} differs after resuming"
    assert resumed == [reference[i] for i in range(ITERATIONS)]  # the log is truncated to the checkpoint on resume

    # The final state, bit for bit: models, optimizers, schedulers, EMA, counters, RNG and data position.
    name = f"step_{ITERATIONS:08d}.pt"
    _assert_same(load_file(ckpt_dir / name), load_file(straight_dir / "checkpoints" / name))
    from safetensors.torch import load_file as load_safetensors

    _assert_same(load_safetensors(killed_dir / "student_ema.safetensors"),
                 load_safetensors(straight_dir / "student_ema.safetensors"), "student_ema")


# Runs `rcm <argv[3:]>` and SIGKILLs itself inside the atomic write of the file named argv[1], at point argv[2]:
# "mid-write" (the temporary half written: cut to half its size at its fsync), "before-rename" (the temporary
# complete), "after-rename" (the target replaced, its folder not yet fsynced).
KILL_IN_WRITE = """
    import os, signal, sys
    target, point = sys.argv[1], sys.argv[2]
    real_fsync, real_replace = os.fsync, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if point == "mid-write" and os.path.basename(path).startswith(f".{target}.tmp-"):
            os.truncate(path, os.path.getsize(path) // 2)  # (fd is read-only)
            die()
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        mine = os.path.basename(dst) == target
        if mine and point == "before-rename":
            die()
        real_replace(src, dst, *args, **kwargs)
        if mine and point == "after-rename":
            die()

    os.fsync, os.replace = fsync, replace
    from rcm import cli
    cli.main(sys.argv[3:])
"""
KILL_POINTS = ("mid-write", "before-rename", "after-rename")


def _safetensors_content(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata (a safetensors file's bytes are not canonical: its metadata order varies)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _assert_same_export(a: Path, b: Path) -> None:
    (ta, ma), (tb, mb) = _safetensors_content(a), _safetensors_content(b)
    assert ma == mb, (ma, mb)
    _assert_same(ta, tb, a.name)


def _run_killed_in_write(target: Path, point: str, argv: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        code = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_IN_WRITE), target.name, point, *argv],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert code == -signal.SIGKILL, f"{point}: exit status {code}, not killed in the write\n" + log.read_text()[-3000:]


def test_a_kill_during_export_leaves_no_partial_file_and_the_rerun_exports_the_same(teacher, tmp_path):
    """The end-of-run export of `rcm distill` and `rcm export`, each killed at every point of its write."""
    from rcm import cli

    def distill(out: Path) -> list[str]:
        command = _command(teacher, out)[3:]  # without "python -m cli"
        command[command.index("--loop.iterations") + 1] = "3"
        return command

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cli.main(distill(straight))
    reference = straight / "student_ema.safetensors"
    target = killed / reference.name
    for point in KILL_POINTS:  # the first launch trains, then dies exporting; the next ones only export
        _run_killed_in_write(target, point, distill(killed), tmp_path / "distill.txt")
        if point == "after-rename":  # the whole new file, or none: never part of one under the target name
            _assert_same_export(target, reference)
        else:
            assert not target.exists() and _temporaries(killed), point  # the killed write's temporary, left over
    cli.main(distill(killed))  # the same command again
    _assert_same_export(target, reference)
    assert not _temporaries(killed) and not _temporaries(killed / "checkpoints")

    # `rcm export` over an older export of another network: the target holds the old file or the new one
    exports = tmp_path / "exports"
    export = ["export", "--checkpoint", str(straight / "checkpoints"), "--dtype", "keep", "--out"]
    cli.main([*export, str(exports / "uninterrupted.safetensors")])
    cli.main([*export, str(exports / "old.safetensors"), "--model", "student"])
    target = exports / "student.safetensors"
    for point in KILL_POINTS:
        shutil.copy(exports / "old.safetensors", target)
        _run_killed_in_write(target, point, [*export, str(target)], tmp_path / "export.txt")
        expected = "uninterrupted.safetensors" if point == "after-rename" else "old.safetensors"
        _assert_same_export(target, exports / expected)
        assert bool(_temporaries(exports)) == (point != "after-rename"), point
    cli.main([*export, str(target)])
    _assert_same_export(target, exports / "uninterrupted.safetensors")
    assert not _temporaries(exports) and sorted(p.name for p in exports.iterdir()) == [  # with each's model card
        "old.card.json", "old.safetensors", "student.card.json", "student.safetensors", "uninterrupted.card.json",
        "uninterrupted.safetensors"]


def test_nonfinite_run_stops_with_status_1_and_keeps_checkpoints(teacher, tmp_path, monkeypatch, capsys):
    """Every batch non-finite from iteration 3 on: step 3 is skipped, the run stops cleanly at the 2nd
    consecutive non-finite step (4); the checkpoint kept holds the weights of the last good step."""
    from rcm import cli
    from rcm.digits.task import DigitsTask

    next_batch = DigitsTask.next_batch
    calls = []

    def poisoned(self):
        x0, labels = next_batch(self)
        calls.append(1)
        return (x0 * float("nan") if len(calls) > 3 else x0), labels

    args = ["distill", "--method", "scm", "--teacher", str(teacher), "--no-report", "--batch-size", "2",
            "--threads", "1", "--loop.checkpoint-every", "1", "--loop.log-every", "1",
            "--loop.max-nonfinite-steps", "2"]  # fmt: skip
    cli.main([*args, "--out-dir", str(tmp_path / "good"), "--loop.iterations", "3"])
    monkeypatch.setattr(DigitsTask, "next_batch", poisoned)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "--out-dir", str(tmp_path / "bad"), "--loop.iterations", "10"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rcm: error: 2 consecutive student steps had non-finite")
    assert "Traceback" not in err and "last good checkpoint is kept" in lines[0]

    logs = _entries(tmp_path / "bad" / "log.jsonl")
    assert [bool(e.get("skipped")) for e in logs] == [False, False, False, True]
    saved, path = load_latest(tmp_path / "bad" / "checkpoints")
    assert path.name in ("step_00000003.pt", "step_00000004.pt")  # after the last good step, or the skipped one
    good, _ = load_latest(tmp_path / "good" / "checkpoints")
    assert good["train"]["iteration"] == 3
    for key in ("student", "ema", "student_optimizer"):  # the skipped step changed none of them
        _assert_same(saved["train"][key], good["train"][key], key)
