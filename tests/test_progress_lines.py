"""Without a terminal the one progress bar prints plain log lines while it runs (issue 20): a user
tailing a log file sees training advance, not one bar when it ends."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from rcm.timing import progress_bar

ROOT = Path(__file__).resolve().parents[1]


def test_lines_every_n_steps_and_at_the_end():
    out = io.StringIO()
    with progress_bar(Console(file=out), info=True, every=3) as bar:
        job = bar.add_task("rcm", total=7, completed=0, info="")
        for i in range(1, 8):
            bar.update(job, completed=i, info=f"loss {i}")
    counts = [line.split()[1] for line in out.getvalue().splitlines()]
    assert counts == ["3/7", "6/7", "7/7"], out.getvalue()
    assert "loss 7" in out.getvalue().splitlines()[-1]


def test_a_slow_step_is_logged_after_the_time_limit():
    out = io.StringIO()
    with progress_bar(Console(file=out), every=100, seconds=0.05) as bar:
        job = bar.add_task("slow", total=1000)
        bar.advance(job)
        time.sleep(0.1)
        bar.advance(job)  # 2 steps, far from 100, but 0.1 s since the last line
        assert out.getvalue().splitlines()[-1].startswith("slow 2/1000")


def test_distill_to_a_pipe_prints_progress_while_training(tmp_path):
    from rcm.digits.model import build_model, save_model

    save_model(build_model("digits-dit-tiny"), tmp_path / "teacher.safetensors", {"kind": "teacher"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rcm", "distill", "--teacher", str(tmp_path / "teacher.safetensors"),
                             "--out-dir", str(tmp_path / "run"), "--no-report", "--loop.iterations", "6",
                             "--threads", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    arrivals = [(time.perf_counter(), line) for line in proc.stdout]
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    progress = [(t, line) for t, line in arrivals if re.match(r"rcm \d+/6 ", line)]
    assert [line.split()[1] for _, line in progress] == [f"{i}/6" for i in range(1, 7)], arrivals
    assert progress[0][0] < progress[-1][0]  # each line arrived as its iteration ended, not all at exit
