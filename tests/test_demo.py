import json
import os

import pytest
import torch

from rcm.digits.data import DigitClips
from rcm.digits.model import (
    DEMO_MODELS,
    DEMO_SPEC,
    NULL_LABEL,
    TEACHER_PATH,
    ClassConditionedDiT,
    TeacherSampling,
    build_model,
    load_model,
    load_teacher,
    model_metadata,
    null_labels,
    sample_teacher,
    save_model,
)
from rcm.digits.teacher import TrainTeacherConfig, rectified_flow_loss, train_teacher


def _randomize_head(model):
    # a fresh Wan DiT has a zero head (it predicts v = 0 whatever the input); give it one
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.dit.head.head.weight.copy_(torch.randn(model.dit.head.head.weight.shape, generator=g) * 0.1)
    return model


def test_model_shapes_and_label_conditioning():
    model = _randomize_head(build_model("digits-dit-tiny"))
    x = torch.randn(3, *DEMO_SPEC.shape)
    t = torch.tensor([10.0, 500.0, 990.0])
    v = model(x, t, torch.tensor([0, 5, NULL_LABEL]))
    assert v.shape == x.shape and v.dtype == torch.float32
    ctx = model.context(torch.tensor([0, 5]))
    cfg = DEMO_MODELS["digits-dit-tiny"]
    assert ctx.shape == (2, cfg.text_len, cfg.text_dim)
    # the label changes the prediction; the same label gives the same prediction
    v_other = model(x, t, torch.tensor([1, 5, NULL_LABEL]))
    assert not torch.allclose(v[0], v_other[0]) and torch.equal(v[1:], v_other[1:])
    assert torch.equal(null_labels(torch.tensor([3, 4])), torch.tensor([NULL_LABEL, NULL_LABEL]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, torch.zeros(3))  # float labels
    with pytest.raises(IndexError):
        model(x, t, torch.tensor([0, 1, NULL_LABEL + 1]))


def test_build_is_deterministic_and_named():
    a, b = build_model("digits-dit-tiny", seed=0), build_model("digits-dit-tiny", seed=0)
    c = build_model("digits-dit-tiny", seed=1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.label_embedding.weight, c.label_embedding.weight)
    with pytest.raises(ValueError, match="digits-dit"):
        build_model("nope")


def test_rectified_flow_loss_is_zero_for_the_true_velocity():
    """An oracle that knows x0 recovers ε − x0 = (x_ρ − x0)/ρ exactly iff x_ρ = (1 − ρ)x0 + ρε with
    timestep 1000ρ: the loss then vanishes. Labels reach the net, dropped to null at the given rate."""
    x0 = DigitClips("train", 64, seed=0).clips
    seen = []

    def oracle(x, timestep, labels):
        seen.append(labels)
        rho = (timestep / 1000.0).view(-1, 1, 1, 1, 1)
        return (x - (1 - rho) * x0) / rho - x0

    labels = torch.arange(64) % 10
    loss = rectified_flow_loss(oracle, x0, labels, torch.Generator().manual_seed(0), label_dropout=0.5)
    assert loss.shape == (64,) and loss.max() < 1e-8
    dropped = seen[0] == NULL_LABEL
    assert 10 < dropped.sum() < 54 and torch.equal(seen[0][~dropped], labels[~dropped])
    wrong = rectified_flow_loss(lambda x, t, y: oracle(x, t, y) + 0.1, x0, labels, torch.Generator().manual_seed(0))
    assert torch.allclose(wrong, torch.full_like(wrong, 0.01))


def test_save_load_roundtrip_and_strictness(tmp_path):
    model = _randomize_head(build_model("digits-dit-tiny"))
    save_model(model, tmp_path / "m.safetensors", {"note": "hi"})
    loaded = load_model(tmp_path / "m.safetensors")
    x, t, y = torch.randn(2, *DEMO_SPEC.shape), torch.tensor([100.0, 900.0]), torch.tensor([2, 7])
    assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert model_metadata(tmp_path / "m.safetensors")["note"] == "hi"
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m.safetensors"))
    sd.pop("label_embedding.weight")
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=model_metadata(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match="label_embedding"):
        load_model(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")


def test_cfg_sampling_queries_null_labels():
    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, x, timestep, labels):
            calls.append(labels.clone())
            return torch.zeros_like(x)

    labels = torch.tensor([3, 8])
    out = sample_teacher(Recorder(), labels, torch.Generator().manual_seed(0), TeacherSampling(steps=3, guidance=2.0))
    assert out.shape == (2, *DEMO_SPEC.shape)
    assert len(calls) == 6 and sum(torch.equal(c, labels) for c in calls) == 3
    assert sum(torch.equal(c, null_labels(labels)) for c in calls) == 3


def test_shipped_teacher_loads_and_samples():
    assert TEACHER_PATH.is_file() and TEACHER_PATH.stat().st_size <= 10 * 2**20
    teacher = load_teacher()
    assert isinstance(teacher, ClassConditionedDiT) and teacher.config == DEMO_MODELS["digits-dit"]
    meta = model_metadata(TEACHER_PATH)
    assert json.loads(meta["recipe"])["model"] == "digits-dit"
    labels = torch.arange(30) % 10
    clips = sample_teacher(teacher, labels, torch.Generator().manual_seed(0), TeacherSampling(steps=8))
    assert clips.shape == (30, *DEMO_SPEC.shape) and torch.isfinite(clips).all()
    # the requested digits, as the shipped classifier reads them (50 steps: see docs/demo.md)
    from rcm.digits.classifier import classifier_accuracy, load_classifier

    assert classifier_accuracy(load_classifier(), clips, labels) >= 0.9
    # a trained teacher draws mostly dark canvas with some bright ink, not noise
    background = (clips < -0.5).float().mean()
    ink = (clips > 0.3).float().mean()
    assert background > 0.6 and 0.02 < ink < 0.3, (background, ink)


def _train(tmp_path, stop_after=None, **kw):
    cfg = TrainTeacherConfig(out_dir=tmp_path, model="digits-dit-tiny", steps=4, batch_size=4, warmup=2,
                             checkpoint_every=2, log_every=1, **kw)
    return train_teacher(cfg, stop_after=stop_after)


def test_tiny_teacher_training_checkpoints_and_resumes_exactly(tmp_path):
    straight = _train(tmp_path / "a")
    assert straight == tmp_path / "a" / "teacher.safetensors" and straight.is_file()
    assert (tmp_path / "a" / "checkpoints" / "step_00000004.pt").is_file()
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4] and all(e["loss"] > 0 for e in log)
    # interrupted after 3 steps (last checkpoint: step 2), then the same command again
    assert _train(tmp_path / "b", stop_after=3) is None
    assert not (tmp_path / "b" / "teacher.safetensors").exists()
    with pytest.raises(ValueError, match="different settings"):
        _train(tmp_path / "b", lr=5e-4)
    if (os.cpu_count() or 1) > 1:  # another thread count changes float sums, so the trajectory: refused too
        with pytest.raises(ValueError, match="different settings.*threads"):
            _train(tmp_path / "b", threads=2)
    resumed = _train(tmp_path / "b")
    a, b = load_model(straight).state_dict(), load_model(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the EMA moved away from the initialisation
    init = build_model("digits-dit-tiny").state_dict()
    assert not torch.equal(a["dit.blocks.0.ffn.0.weight"], init["dit.blocks.0.ffn.0.weight"])
