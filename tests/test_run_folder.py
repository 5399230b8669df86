"""One run folder, one writer, one run's files (issue 17): the lock, foreign files, content fingerprints,
and a completed run asked for fewer iterations."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rcm import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from rcm.digits.model import build_model, save_model

    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(build_model("digits-dit-tiny", seed=3), path, {"kind": "teacher"})
    return path


def _args(teacher: Path, out: Path, iterations: int = 4) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--out-dir", str(out), "--no-report", "--batch-size", "2",
            "--threads", "1", "--loop.iterations", str(iterations), "--loop.checkpoint-every", "2",
            "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2"]


def _user_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_a_second_run_on_a_busy_folder_exits_2_and_the_first_equals_a_lone_run(teacher, tmp_path):
    out, lone = tmp_path / "run", tmp_path / "lone"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "rcm", *_args(teacher, out, iterations=40)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (out / "log.jsonl").is_file():  # the first run holds the folder and is training
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "rcm", *_args(teacher, out, iterations=40)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert time.monotonic() - start < 30
    message = second.stderr.strip()
    assert "\n" not in message and "in use" in message and f"pid {first.pid}" in message, message
    assert first.wait(timeout=600) == 0, first.stdout.read().decode()
    cli.main(_args(teacher, lone, iterations=40))
    a, b = load_file(out / "student_ema.safetensors"), load_file(lone / "student_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_with_someone_elses_files_is_refused_before_any_write(teacher, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text("my own notes\n")
    err = _user_error(_args(teacher, folder), capsys)
    assert "--out-dir" in err and "config.json" in err
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == "my own notes\n"


@pytest.mark.parametrize("out", ["", "."])
def test_the_current_directory_is_not_a_run_folder(teacher, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    err = _user_error(_args(teacher, Path("x"))[:4] + [out] + _args(teacher, Path("x"))[5:], capsys)
    assert "--out-dir" in err
    assert list(tmp_path.iterdir()) == []


def test_no_resume_on_a_run_folder_is_refused(teacher, tmp_path, capsys):
    cli.main(_args(teacher, tmp_path / "r", iterations=2))
    err = _user_error(_args(teacher, tmp_path / "r", iterations=2) + ["--no-resume"], capsys)
    assert "already holds a run" in err


def test_fewer_iterations_than_done_is_refused(teacher, tmp_path, capsys):
    cli.main(_args(teacher, tmp_path / "r", iterations=4))
    exported = (tmp_path / "r" / "student_ema.safetensors").read_bytes()
    err = _user_error(_args(teacher, tmp_path / "r", iterations=2), capsys)
    assert "--loop.iterations" in err and "4" in err
    assert (tmp_path / "r" / "student_ema.safetensors").read_bytes() == exported


def test_the_teacher_is_fingerprinted_by_content_not_by_name(teacher, tmp_path, capsys):
    from rcm.digits.model import build_model, save_model

    own = tmp_path / "t" / "teacher.safetensors"
    own.parent.mkdir()
    own.write_bytes(teacher.read_bytes())
    cli.main(_args(own, tmp_path / "r", iterations=2))
    through_dots = tmp_path / "t" / ".." / "t" / "teacher.safetensors"  # the same file, spelled otherwise
    cli.main(_args(through_dots, tmp_path / "r", iterations=4))
    save_model(build_model("digits-dit-tiny", seed=4), own, {"kind": "teacher"})  # other weights, same name
    err = _user_error(_args(own, tmp_path / "r", iterations=6), capsys)
    assert "--teacher" in err and "different settings" in err and len(err) < 500  # short: the differing field only, not the whole config


def test_another_thread_count_is_another_run(teacher, tmp_path, capsys):
    cli.main(_args(teacher, tmp_path / "r", iterations=2))
    argv = _args(teacher, tmp_path / "r", iterations=4)
    argv[argv.index("--threads") + 1] = "2"
    err = _user_error(argv, capsys)
    assert "--threads: 1 (saved) vs 2 (now)" in err
