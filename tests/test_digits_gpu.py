"""The digits commands on CUDA (`--device cuda`): a few iterations of distillation with its report, a few
teacher steps, `rcm eval` and `rcm sample`. Skipped without a CUDA device."""

import json

import pytest
import torch

from rcm import cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_digits_commands_on_cuda(tmp_path):
    from rcm.digits.evaluate import DigitsReport
    from rcm.digits.sample import DigitsSampleConfig, sample_digits
    from rcm.digits.task import DigitsDistillConfig, distill_digits
    from rcm.train import LoopConfig

    run = tmp_path / "rcm"
    summary = distill_digits(DigitsDistillConfig(
        device="cuda", out_dir=run, batch_size=4, loop=LoopConfig(iterations=6, checkpoint_every=3),
        report_settings=DigitsReport(num_per_class=2, num_real=20, teacher_steps=(2,))))
    assert summary["peak_memory_gib"] > 0  # the training ran on the GPU
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["teacher@2", "rcm@1", "rcm@2", "rcm@4"]
    assert all(0 <= r["frame_accuracy"] <= 1 for r in rows)

    cli.main(["eval", "--device", "cuda", "--runs", str(run), "--out-dir", str(tmp_path / "eval"),
              "--report-settings.num-per-class", "2", "--report-settings.num-real", "20",
              "--report-settings.teacher-steps", "2"])
    assert (tmp_path / "eval" / "metrics.json").is_file()

    cuda = sample_digits(DigitsSampleConfig(device="cuda", checkpoint=run / "student_ema.safetensors", steps=2,
                                            save_path=tmp_path / "gpu.npz"))
    cli.main(["sample", "--device", "cpu", "--checkpoint", str(run / "student_ema.safetensors"),
              "--steps", "2", "--save-path", str(tmp_path / "cpu.npz")])
    import numpy as np

    a, b = np.load(tmp_path / "gpu.npz")["clips"], np.load(tmp_path / "cpu.npz")["clips"]
    assert cuda.kind == "student" and np.abs(a - b).max() < 5e-3  # same noise (drawn on the CPU), same clips

    teacher = tmp_path / "teacher"
    cli.main(["train-teacher", "--device", "cuda", "--out-dir", str(teacher), "--model", "digits-dit-tiny",
              "--steps", "4", "--batch-size", "4", "--warmup", "2"])
    assert (teacher / "teacher.safetensors").is_file()
