"""Outputs chain: `rcm export` of a digits run's checkpoint writes a file `rcm sample` accepts
(the checkpoint carries the network's architecture, recorded by the task at the start of the run)."""

import json

import cli
from rcm.digits.model import load_model


def test_export_then_sample(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    cli.main(["distill", "--out-dir", str(run), "--loop.iterations", "2", "--batch-size", "2", "--no-report",
              "--loop.checkpoint-every", "1"])
    exported = tmp_path / "x.safetensors"
    cli.main(["export", "--checkpoint", str(run / "checkpoints"), "--out", str(exported), "--dtype", "float32"])
    student = load_model(exported)  # the architecture came with the checkpoint
    reference = load_model(run / "student_ema.safetensors")
    assert student.config == reference.config and student.num_classes == reference.num_classes
    for (name, a), (_, b) in zip(sorted(student.state_dict().items()), sorted(reference.state_dict().items())):
        assert a.equal(b), name  # the newest checkpoint's EMA is the exported student
    cli.main(["sample", "--checkpoint", str(exported), "--save-path", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0
