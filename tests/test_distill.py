"""`rcm distill` end to end on a tiny teacher: every output file, the table, determinism."""

import json

import numpy as np

import imageio.v2 as imageio
import pytest
import torch

from rcm import cli
from rcm.digits.model import load_model


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Caches (teacher rows) go to a fresh user cache dir, never to the real one or the package."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rcm"


def _distill(out, teacher, *extra):
    cli.main(["distill", "--teacher", str(teacher), "--out-dir", str(out), "--batch-size", "2",
              "--loop.iterations", "4", "--loop.checkpoint-every", "2", "--loop.log-every", "1", "--threads", "1",
              "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2",
              "--report-settings.num-per-class", "2", "--report-settings.num-real", "20",
              "--report-settings.teacher-steps", "1", "2", *extra])


def test_distill_writes_every_output_and_is_deterministic(tmp_path, tiny_teacher, capsys):
    _distill(tmp_path / "a", tiny_teacher)
    out = capsys.readouterr().out
    run = tmp_path / "a"
    for name in ("samples.png", "samples.gif", "samples.mp4", "metrics.json", "student_ema.safetensors",
                 "config.json", "log.jsonl"):
        assert (run / name).is_file(), name
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher@1", "teacher@2", "rcm@1", "rcm@2", "rcm@4"]
    assert all(0 <= r["frame_accuracy"] <= 1 and 0 <= r["switching_share"] <= 1 and r["frame_fd"] >= 0
               and r["frame_diversity"] >= 0 and r["speed_ratio"] >= 0 for r in rows)
    assert "rcm@4" in out and "frame FD" in out  # the table reached the terminal
    assert (run / "metrics.md").read_text().count("\n") == 2 + len(rows)
    gif = imageio.mimread(run / "samples.gif")
    assert len(gif) == 8  # one animation frame per clip frame
    strip = np.asarray(gif[0])[:16]  # each generator's row is titled: dark text on a white strip
    assert strip.mean() > 200 and strip.min() < 100
    assert set((run / "samples_order.txt").read_text().split()) <= {r["name"] for r in rows}
    assert imageio.imread(run / "samples.png").ndim == 2
    student = load_model(run / "student_ema.safetensors")
    assert student.config == load_model(tiny_teacher).config

    _distill(tmp_path / "b", tiny_teacher, "--no-report")
    timing = ("seconds", "seconds_per_iteration")  # wall clock: differs between any two runs
    a = [{k: v for k, v in json.loads(x).items() if k not in timing} for x in (run / "log.jsonl").read_text().splitlines()]
    b = [{k: v for k, v in json.loads(x).items() if k not in timing}
         for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert a == b  # same seed, same trajectory
    sa, sb = load_model(run / "student_ema.safetensors"), load_model(tmp_path / "b" / "student_ema.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(sa.state_dict().values(), sb.state_dict().values()))


def test_methods_run(tmp_path, tiny_teacher):
    for method in ("scm", "dmd2"):
        _distill(tmp_path / method, tiny_teacher, "--method", method, "--no-report")
        phases = [json.loads(x)["phase"] for x in (tmp_path / method / "log.jsonl").read_text().splitlines()]
        assert phases == (["student"] * 4 if method == "scm" else ["student", "critic", "student", "critic"])


def test_the_engine_config_alone_names_no_model():
    """DistillConfig is what applications extend; used bare it says so instead of guessing a run folder."""
    from rcm.train import DistillConfig

    with pytest.raises(NotImplementedError, match="DigitsDistillConfig, WanDistillConfig"):
        DistillConfig().run_dir


def test_the_card_gives_only_complete_mid_times(tmp_path, tiny_teacher):
    """With --report-settings.mid-times of one time (enough for 2 steps), the student's card gives mid-times for
    1 and 2 steps only, not a 1-time list for 3 or 4 steps that would mis-sample."""
    run = tmp_path / "a"
    _distill(run, tiny_teacher, "--report-settings.mid-times", "0.7", "--report-settings.student-steps", "1", "2")
    card = json.loads((run / "student_ema.card.json").read_text())
    assert card["sampling"]["mid_times"] == {"1": [], "2": [0.7]}
