"""The image-to-video digits miniature (rcm/digits/i2v.py): the first frame given, the motion generated.
The shipped I2V teacher, its fine-tuning, the distillation end to end on a tiny budget with the I2V report,
and the two-expert teacher."""
import json

import pytest
import torch

from rcm import cli
from rcm.digits.i2v import (
    GIVEN_FRAME_BOUND,
    I2V_TEACHER_PATH,
    FinetuneI2VConfig,
    finetune_i2v_teacher,
    first_frame_condition,
    i2v_flow_loss,
    load_i2v_student,
    load_i2v_teacher,
    sample_i2v_student,
)
from rcm.digits.model import DEMO_SPEC, model_metadata
from rcm.models import WanExperts


def clips(n=4, seed=0):
    return torch.rand(n, *DEMO_SPEC.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_flow_loss_ignores_the_network_on_the_given_frame(tiny_teacher):
    model = load_i2v_teacher(tiny_teacher)
    x0, labels = clips(), torch.tensor([0, 3, 5, 9])

    def loss(net):
        return i2v_flow_loss(net, x0, labels, torch.Generator().manual_seed(1))

    seen = []

    def recording(x, timestep, y):
        seen.append((x, timestep))
        return model(x, timestep, y)

    base = loss(recording)
    x, timestep = seen[0]
    assert torch.equal(x[:, :, 0], x0[:, :, 0]) and bool((timestep[:, :, 0] == 0).all())
    assert bool((timestep[:, :, 1:] > 0).all()) and timestep.shape == (4, 1, DEMO_SPEC.frames, 1, 1)
    junk_on_given = lambda x, t, y: model(x, t, y) + torch.where(first_frame_condition(x0).mask, 7.0, 0.0)  # noqa: E731
    assert torch.equal(loss(junk_on_given), base)
    assert not torch.equal(loss(lambda x, t, y: model(x, t, y) + 0.1), base)


def test_finetune_writes_a_loadable_teacher_that_moved(tiny_teacher, tmp_path):
    out = tmp_path / "i2v.safetensors"
    model = finetune_i2v_teacher(FinetuneI2VConfig(teacher=tiny_teacher, out=out, steps=3, batch_size=4), log=lambda s: None)
    loaded = load_i2v_teacher(out)
    start = load_i2v_teacher(tiny_teacher)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), start.state_dict().values()))
    assert json.loads(model_metadata(out)["recipe"])["steps"] == "3"
    with pytest.raises(ValueError, match="steps"):
        FinetuneI2VConfig(steps=0)


def _distill(out, teacher, *extra):
    cli.main(["distill", "digits-i2v", "--teacher", str(teacher), "--out-dir", str(out), "--batch-size", "2",
              "--loop.iterations", "4", "--loop.checkpoint-every", "2", "--loop.log-every", "1", "--threads", "1",
              "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2",
              "--i2v-report.num-clips", "20", "--i2v-report.teacher-steps", "4",
              "--i2v-report.student-steps", "1", "2", "--i2v-report.num-real", "100", *extra])


def test_distill_i2v_end_to_end_reports_the_given_frame_and_the_student_against_its_teacher(tmp_path, tiny_teacher):
    """A tiny I2V teacher, rCM for 4 iterations, then the report on 20 held-out first frames."""
    _distill(tmp_path / "run", tiny_teacher)
    run = tmp_path / "run"
    metrics = json.loads((run / "i2v_metrics.json").read_text())
    rows = {r["name"]: r for r in metrics["rows"]}
    assert list(rows) == ["data", "teacher@4", "rcm@1", "rcm@2"]
    for row in rows.values():
        assert row["given_frame_error"] <= GIVEN_FRAME_BOUND  # the given frame reproduced
        assert 0 <= row["accuracy"] <= 1 and row["continuity"] >= 0 and row["motion"] >= 0
    assert rows["data"]["accuracy"] >= 0.9  # the classifier reads the real clips (a random tiny teacher keeps no digit)
    assert rows["teacher@4"]["motion"] > 0.05  # it generates frames, not copies of the given one
    assert all(r["vs_teacher"] >= 0 for n, r in rows.items() if n.startswith("rcm@"))
    for row in rows.values():  # the per-frame metrics of rcm/digits/metrics.py, for every generator
        assert 0 <= row["frame_accuracy"] <= 1 and 0 <= row["switching_share"] <= 1
        assert row["frame_fd"] >= 0 and row["frame_diversity"] >= 0 and row["given_frame_within_bound"]
    assert rows["data"]["frame_accuracy"] >= 0.9 and rows["data"]["frame_fd"] < rows["teacher@4"]["frame_fd"]
    assert metrics["given_frame_bound"] == GIVEN_FRAME_BOUND
    assert (run / "i2v_samples.png").is_file()
    student = load_i2v_student(run / "student_ema.safetensors")
    assert student.config == load_i2v_teacher(tiny_teacher).config


def test_two_expert_teacher_distills_one_student_per_expert(tmp_path, tiny_teacher):
    _distill(tmp_path / "two", tiny_teacher, "--experts", "two", "--boundary", "0.9")
    run = tmp_path / "two"
    student = load_i2v_student(run / "student_ema.safetensors")
    assert isinstance(student, WanExperts) and student.boundary == 0.9
    teacher = load_i2v_teacher(tiny_teacher)
    # each expert of the student moved away from the teacher, and differently (each trained on its range)
    for expert in (student.high_noise, student.low_noise):
        assert any(not torch.equal(a, b) for a, b in zip(expert.state_dict().values(), teacher.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(student.high_noise.state_dict().values(),
                                                      student.low_noise.state_dict().values()))
    rows = json.loads((run / "i2v_metrics.json").read_text())["rows"]
    assert all(r["given_frame_error"] <= GIVEN_FRAME_BOUND for r in rows)
def test_report_of_the_shipped_i2v_teacher_and_its_student_on_a_tiny_budget(tmp_path):
    """The shipped I2V teacher distilled for 4 iterations: the report's per-frame metrics show the teacher
    keeping the digit frame by frame (it was fine-tuned to), the given frame within its bound everywhere."""
    _distill(tmp_path / "shipped", I2V_TEACHER_PATH)
    rows = {r["name"]: r for r in json.loads((tmp_path / "shipped" / "i2v_metrics.json").read_text())["rows"]}
    assert list(rows) == ["data", "teacher@4", "rcm@1", "rcm@2"]
    assert all(r["given_frame_error"] <= GIVEN_FRAME_BOUND for r in rows.values())
    assert rows["teacher@4"]["frame_accuracy"] >= 0.8 and rows["teacher@4"]["frame_diversity"] > 0.3
    for name in ("rcm@1", "rcm@2"):
        assert {"frame_accuracy", "switching_share", "frame_fd", "frame_diversity", "vs_teacher"} <= set(rows[name])


def test_the_shipped_i2v_teacher():
    assert I2V_TEACHER_PATH.stat().st_size < 5_000_000
    meta = model_metadata(I2V_TEACHER_PATH)
    assert "first frame" in meta["conditioning"] and json.loads(meta["recipe"])["steps"] == "300"
    teacher = load_i2v_teacher()
    given = clips(3, seed=2)
    out = sample_i2v_student(teacher, given, torch.tensor([1, 2, 3]), torch.Generator().manual_seed(0), steps=1)
    assert float((out[:, :, 0] - given[:, :, 0]).abs().max()) <= GIVEN_FRAME_BOUND


