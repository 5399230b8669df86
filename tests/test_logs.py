"""A digits distill run's logs: TensorBoard event files read back with the tensorboard library, W&B offline
(where installed), the end-of-run log.png and `rcm plot`; a sink whose package is missing refused up front."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from rcm import cli
from rcm.train.plots import LOG_LINE, PANEL
from rcm.train.sinks import scalar_tag

ITERATIONS = 6


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _distill(out, teacher, *extra, iterations=ITERATIONS):
    cli.main(["distill", "--teacher", str(teacher), "--out-dir", str(out), "--batch-size", "2",
              "--loop.iterations", str(iterations), "--loop.checkpoint-every", "2", "--loop.log-every", "1",
              "--threads", "1", "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2",
              "--sample-every", "3", "--no-report", *extra])


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_teacher):
    """A run to 4 iterations, resumed to 6 (default sinks: jsonl + tensorboard)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    _distill(run, tiny_teacher, iterations=4)
    _distill(run, tiny_teacher)
    return run


def test_tensorboard_scalars_and_images_match_the_json_log(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records(finished_run)
    assert [r["iteration"] for r in records] == list(range(ITERATIONS))
    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss/scm", "loss/dmd", "loss/critic", "scm/g_norm", "dmd/omega", "student/lr", "critic/lr",
                 "student/grad_norm", "critic/grad_norm", "scm/nonfinite", "run/seconds_per_iteration"):
        assert name in tags, (name, sorted(tags))
    expected = {}  # tag -> {iteration: value}, from log.jsonl
    for r in records:
        for key, value in r.items():
            if key not in ("iteration", "phase"):
                expected.setdefault(scalar_tag(key, r), {})[r["iteration"]] = value
    assert tags == set(expected)
    for tag, values in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        # the resumed run's events join the first run's without a repeated or missing iteration
        assert sorted(e.step for e in events.Scalars(tag)) == sorted(values), tag
        if tag != "run/seconds":  # the first run's clock restarts at the resume
            assert all(math.isclose(got[k], v, rel_tol=1e-6, abs_tol=1e-30) for k, v in values.items()), tag
    # the digits periodic samples: a clip per digit and row, frames left to right, at each step count
    assert set(events.Tags()["images"]) == {"samples/1step", "samples/2step", "samples/4step"}
    for image in events.Images("samples/2step"):
        assert image.width > image.height / 10 * 7  # 8 frames across, 10 digits down
    assert [i.step for i in events.Images("samples/4step")] == [3, 6]
    assert sorted(p.name for p in (finished_run / "samples").glob("iter_00000006_*.png")) == [
        "iter_00000006_1step.png", "iter_00000006_2step.png", "iter_00000006_4step.png"]


def _panel_keys(records):
    keys = []
    for r in records:
        keys += [k for k, v in r.items() if k not in keys and k not in ("iteration", "phase", "seconds")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


def _check_log_png(path, n_panels):
    """A grid of 4 panels a row; each of the n panels holds the line colour, the cells after them are blank."""
    image = np.asarray(Image.open(path).convert("RGB"))
    rows = math.ceil(n_panels / 4)
    assert image.shape == (rows * PANEL[1], 4 * PANEL[0], 3)
    line = np.all(image == LOG_LINE, axis=-1)
    for k in range(rows * 4):
        y, x = (k // 4) * PANEL[1], (k % 4) * PANEL[0]
        cell = image[y : y + PANEL[1], x : x + PANEL[0]]
        if k < n_panels:
            assert line[y : y + PANEL[1], x : x + PANEL[0]].sum() >= 20, f"panel {k} has no line"
        else:
            assert (cell == 255).all(), f"cell {k} should be empty"


def test_end_of_run_plot_has_a_panel_per_logged_number(finished_run):
    records = _records(finished_run)
    keys = _panel_keys(records)
    assert {"loss_scm", "loss_dmd", "loss_critic", "scm_g_norm", "dmd_omega", "student_lr",
            "student_grad_norm"} <= set(keys)
    _check_log_png(finished_run / "log.png", len(keys))


def test_plot_command_writes_log_png_of_any_run_folder(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "log.jsonl").write_text((finished_run / "log.jsonl").read_text() + '{"iteration": 6, "los')  # torn line
    cli.main(["plot", str(run)])
    assert "log.png" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl", "log.png"]  # nothing claimed, no temporaries
    _check_log_png(run / "log.png", len(_panel_keys(_records(finished_run))))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: None, "no folder at"),
    (lambda d: d.mkdir(), "holds no log.jsonl"),
    (lambda d: (d.mkdir(), (d / "log.jsonl").write_text("")), "holds no logged iteration"),
])
def test_plot_command_refuses_a_folder_without_a_log(tmp_path, capsys, make, fragment):
    folder = tmp_path / "run"
    make(folder)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(folder)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("rcm: error: ")
    assert fragment in err, err


def test_a_sink_without_its_package_is_refused_before_work(tmp_path, tiny_teacher, monkeypatch, capsys):
    from rcm.train.config import SINK_PACKAGES

    monkeypatch.setitem(SINK_PACKAGES, "tensorboard", "rcm_no_such_package")
    with pytest.raises(SystemExit) as exit_info:
        _distill(tmp_path / "run", tiny_teacher, "--log", "jsonl", "tensorboard")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("rcm: error: --log: tensorboard logging needs the rcm_no_such_package package"), err
    assert not (tmp_path / "run").exists()


def test_jsonl_alone_writes_no_event_files(tmp_path, tiny_teacher):
    _distill(tmp_path / "run", tiny_teacher, "--log", "jsonl", iterations=2)
    assert (tmp_path / "run" / "log.jsonl").is_file() and (tmp_path / "run" / "log.png").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_wandb_offline(tmp_path, tiny_teacher, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (the optional `wandb` extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _distill(tmp_path / "run", tiny_teacher, "--log", "jsonl", "wandb", iterations=3)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_scalar_tags_group_by_term_and_phase():
    record = {"iteration": 3, "phase": "student", "loss_scm": 1.0, "scm_g_norm": 2.0, "student_lr": 1e-4,
              "seconds_per_iteration": 0.1}
    assert [scalar_tag(k, record) for k in list(record)[2:]] == ["loss/scm", "scm/g_norm", "student/lr",
                                                                  "run/seconds_per_iteration"]


def test_a_resumed_run_continues_its_wandb_run(tmp_path, tiny_teacher, monkeypatch):
    """The W&B run id lives in the run folder: resuming passes the same id (resume="allow"), so the W&B run
    goes on rather than a second one starting. wandb itself is stood in for (it is an optional extra)."""
    import importlib.machinery
    import sys
    import types

    inits, logged = [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((len(inits), step))

        def finish(self):
            pass

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: inits.append(kwargs) or FakeRun()
    fake.Image = lambda image: image
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    _distill(run, tiny_teacher, "--log", "jsonl", "wandb", iterations=2)
    _distill(run, tiny_teacher, "--log", "jsonl", "wandb", iterations=4)
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (run / "wandb" / "rcm_run_id").read_text()
    assert all(i["resume"] == "allow" and i["mode"] == "offline" for i in inits)
    assert [step for call, step in logged if call == 2 and step > 2], logged  # the resumed run logged on
