"""The digits report's pieces: per-step-count student mid-times, the teacher-rows cache outside the package."""

import json

import pytest
import torch

from rcm.digits import presets
from rcm.digits.evaluate import SHIPPED_TEACHER_ROWS, DigitsReport, digits_report, teacher_rows_cache
from rcm.digits.model import TeacherSampling, build_model, sample_student
from rcm.samplers import consistency_times


def test_student_mid_times_per_step_count():
    assert presets.student_mid_times(1) == ()
    assert presets.student_mid_times(2) == (0.8,)
    assert presets.student_mid_times(4) == (0.8, 0.6, 0.4)
    for steps in presets.STUDENT_MID_TIMES:  # every preset is a valid, decreasing schedule
        consistency_times(steps, sigma_max=presets.STUDENT_SIGMA_MAX, mid_times=presets.student_mid_times(steps))
    with pytest.raises(ValueError, match="steps"):
        presets.student_mid_times(5)


def test_sample_student_uses_the_presets_mid_times():
    model = build_model("digits-dit-tiny")
    labels = torch.arange(3)
    draw = lambda **kw: sample_student(model, labels, torch.Generator().manual_seed(0), steps=2, **kw)  # noqa: E731
    default, preset, reference = draw(), draw(mid_times=(0.8,)), draw(mid_times=(1.5,))
    assert torch.equal(default, preset) and not torch.equal(default, reference)


def test_report_caches_teacher_rows_in_the_user_cache_not_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    shipped = SHIPPED_TEACHER_ROWS.read_bytes()
    teacher = build_model("digits-dit-tiny")
    path = tmp_path / "teacher.safetensors"
    from rcm.digits.model import save_model

    save_model(teacher, path, {"kind": "teacher"})
    report = DigitsReport(student_steps=(), teacher_steps=(1,), num_per_class=2, num_real=20)
    fresh = digits_report(teacher, {}, tmp_path / "a", report, TeacherSampling(), teacher_path=path, write_media=False)
    assert teacher_rows_cache() == tmp_path / "cache" / "rcm" / "digits_teacher_metrics.json"
    cache = json.loads(teacher_rows_cache().read_text())
    assert len(cache) == 1 and SHIPPED_TEACHER_ROWS.read_bytes() == shipped
    again = digits_report(teacher, {}, tmp_path / "b", report, TeacherSampling(), teacher_path=path, write_media=False)
    assert again[0].pop("cached") is True and again[0] == fresh[0]
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["rows"][0]["frame_fd"] == fresh[0]["frame_fd"]


def test_shipped_teacher_rows_hold_every_metric():
    rows = json.loads(SHIPPED_TEACHER_ROWS.read_text())
    names = sorted(r["name"] for r in rows.values())
    assert names == ["teacher@1", "teacher@2", "teacher@4", "teacher@50"]
    for r in rows.values():
        assert {"frame_accuracy", "switching_share", "frame_fd", "frame_diversity", "stray_ink"} <= set(r)


@pytest.mark.parametrize("command", [["distill"], ["train-teacher"], ["eval", "--runs"], ["sample"], ["study"]])
def test_device_cuda_without_cuda_is_a_one_line_error_naming_the_flag(command, capsys, tmp_path, monkeypatch):
    from rcm import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA, wherever this runs

    argv = [*command, "--device", "cuda"]
    if command[0] == "eval":  # eval checks its runs first: give it a finished-looking one
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "student_ema.safetensors").write_bytes(b"")
        argv = ["eval", "--runs", str(tmp_path / "run"), "--device", "cuda"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--device" in err and "cuda" in err and err.count("\n") == 1, err


def test_report_settings_are_checked_before_any_work():
    from rcm import ConfigError

    with pytest.raises(ConfigError, match="student_steps"):
        DigitsReport(student_steps=(5,))
    with pytest.raises(ConfigError, match="mid_times"):
        DigitsReport(student_steps=(4,), mid_times=(1.0,))
    with pytest.raises(ConfigError, match="num_real"):
        DigitsReport(num_real=-5)
    assert DigitsReport(student_steps=(5,), mid_times=(1.4, 1.2, 1.0, 0.5)).student_steps == (5,)
