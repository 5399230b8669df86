"""No command writes inside the installed package (issue 17): the commands that could write caches or
default outputs run against a read-only copy of `rcm/` and `cli.py`, with XDG_CACHE_HOME and the working
directory elsewhere. Each must succeed, and the copy must be unchanged, file for file (content, mode and
mtime, and no new file). The copy is made read-only (`chmod -R a-w`); since root ignores file modes, the
comparison of the tree before and after is what makes the test hold for every user. Python's own
bytecode goes to PYTHONPYCACHEPREFIX (a read-only install gets none written, silently)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_REPORT = ["--report-settings.num-per-class", "2", "--report-settings.num-real", "20",
               "--report-settings.teacher-steps", "1", "--report-settings.student-steps", "1"]
# Every command with its defaults for where files go (outputs, caches), on tiny budgets. One process runs them
# all (`cli.main`, as `rcm ...` does), one more runs `python3 -m rcm.digits.metrics`.
COMMANDS = [
    ["distill", "--out-dir", "runs/digits-rcm", "--loop.iterations", "2", "--batch-size", "2", "--threads", "1",
     "--device", "cpu", *TINY_REPORT],
    ["eval", "--runs", "runs/digits-rcm", "--device", "cpu", *TINY_REPORT],
    ["sample", "--steps", "2", "--device", "cpu"],
    ["sample", "--checkpoint", "runs/digits-rcm/student_ema.safetensors", "--steps", "1", "--save-path",
     "student.gif", "--device", "cpu"],
    ["study", "--methods", "scm", "--snapshots", "2", "--batch-size", "2", "--num-per-class", "2", "--num-real",
     "20", "--teacher-steps", "1", "--student-steps", "1", "--threads", "1", "--device", "cpu"],
    ["export", "--checkpoint", "runs/digits-rcm/checkpoints", "--out", "exported.safetensors"],
    ["train-teacher", "--model", "digits-dit-tiny", "--steps", "2", "--batch-size", "2", "--warmup", "1",
     "--threads", "1", "--device", "cpu"],
    ["train-classifier", "--steps", "2", "--batch-size", "4", "--num-test", "10", "--width", "4"],
    ["train-i2v-teacher", "--steps", "1", "--batch-size", "2", "--threads", "1"],
]
DRIVER = """
    import json, sys
    import cli, rcm
    print("rcm from", rcm.__file__, flush=True)
    for argv in json.loads(sys.argv[1]):
        print("running rcm", " ".join(argv), flush=True)
        cli.main(argv)
"""


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        out[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), info.st_mtime_ns if path.is_file() else None,
                                            digest)
    return out


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    """A read-only copy of the package: <tmp>/site/rcm, <tmp>/site/cli.py."""
    site = tmp_path_factory.mktemp("site")
    shutil.copytree(ROOT / "rcm", site / "rcm", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "cli.py", site / "cli.py")
    for path in [site, *site.rglob("*")]:
        path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
    yield site
    for path in [site, *site.rglob("*")]:  # writable again, so that pytest can remove it
        path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o200)


def test_no_command_writes_inside_a_read_only_package(install, tmp_path):
    import json

    before = _tree(install)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(install), "XDG_CACHE_HOME": str(cache), "HOME": str(tmp_path / "home"),
           "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(DRIVER), json.dumps(COMMANDS)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"rcm from {install / 'rcm' / '__init__.py'}" in done.stdout  # the copy ran, not the checkout
    assert done.stdout.count("running rcm ") == len(COMMANDS)
    metrics = subprocess.run([sys.executable, "-m", "rcm.digits.metrics", "--steps", "2", "--batch-size", "16",
                              "--width", "4", "--feature-dim", "8", "--num-test", "10", "--log-every", "1"],
                             cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert metrics.returncode == 0, metrics.stdout[-3000:] + metrics.stderr[-3000:]

    assert _tree(install) == before
    # where things went instead: the working directory and the user cache
    for name in ("runs/digits-rcm/student_ema.safetensors", "runs/eval/metrics.json", "samples.png", "student.gif",
                 "runs/study/study.json", "exported.safetensors", "runs/teacher/teacher.safetensors",
                 "runs/classifier.safetensors", "runs/digits_i2v_teacher.safetensors"):
        assert (work / name).is_file(), name
    assert (cache / "rcm" / "digits_teacher_metrics.json").is_file()
    assert (cache / "rcm" / "digits_frame_classifier.safetensors").is_file()
