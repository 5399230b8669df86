import numpy as np
import pytest
import torch

from rcm.digits.classifier import (
    CLASSIFIER_PATH,
    DigitClassifier,
    TrainClassifierConfig,
    classifier_accuracy,
    load_classifier,
    save_classifier,
    train_classifier,
)
from rcm.digits.data import ClipSpec, DigitClips
from rcm.digits.evaluate import (
    EvalConfig,
    RealReference,
    clip_metrics,
    data_generator,
    evaluate,
    frechet_distance,
    mean_intra_class_distance,
)


def _scipy_fd(a, b):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_and_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift by δ: FD = |δ|²
    assert frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 6, rel=1e-8)
    # isotropic scale s (same mean): FD = tr Σ (1 − s)²
    cov_trace = torch.cov(a.T).trace().item()
    centred = a - a.mean(0)
    assert frechet_distance(centred, 2 * centred) == pytest.approx(cov_trace, rel=1e-8)


def test_diversity_of_known_sets():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 5, generator=g, dtype=torch.float64)
    labels = torch.arange(60) % 3
    d = mean_intra_class_distance(feats, labels)
    assert d > 1.0
    assert mean_intra_class_distance(feats * 0.5, labels) == pytest.approx(d * 0.5)
    collapsed = feats[labels == 0][:1].expand(60, 5)
    assert mean_intra_class_distance(collapsed, labels) == pytest.approx(0.0, abs=1e-12)
    # pairs only: two points at distance 5 in one class
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    assert mean_intra_class_distance(two, torch.tensor([1, 1])) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        mean_intra_class_distance(two, torch.tensor([0, 1]))


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def real():
    return DigitClips("test", 300, seed=7)


def test_shipped_classifier_is_accurate_on_held_out_clips(classifier, real):
    assert CLASSIFIER_PATH.is_file()
    acc = classifier_accuracy(classifier, real.clips, real.labels)
    assert acc >= 0.95, acc


def test_metrics_on_identical_and_collapsed_sets(classifier, real):
    ref = RealReference.from_clips(classifier, real.clips, real.labels)
    same = clip_metrics(classifier, real.clips, real.labels, ref)
    assert same["fd"] == pytest.approx(0.0, abs=1e-6)
    assert same["diversity"] == pytest.approx(1.0, abs=1e-9)
    assert same["accuracy"] >= 0.95
    # one clip per class, copied: no diversity at all, and far from the data in FD
    first = torch.stack([(real.labels == c).nonzero()[0, 0] for c in range(10)])
    idx = first[real.labels]
    copies = clip_metrics(classifier, real.clips[idx], real.labels, ref)
    assert copies["diversity"] == pytest.approx(0.0, abs=1e-9)
    assert copies["fd"] > 10 * max(same["fd"], 1e-3)
    # noise is neither accurate nor close
    noise = torch.rand(real.clips.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bad = clip_metrics(classifier, noise, real.labels, ref)
    assert bad["accuracy"] < 0.3 and bad["fd"] > copies["fd"] / 10
    # an independent real set scores near the data
    other = DigitClips("test", 300, seed=8)
    fresh = clip_metrics(classifier, other.clips, other.labels, ref)
    assert fresh["accuracy"] >= 0.95 and 0.8 < fresh["diversity"] < 1.25 and fresh["fd"] < bad["fd"] / 10


def test_clip_metrics_rejects_bad_input(classifier, real):
    ref = RealReference.from_clips(classifier, real.clips[:20], real.labels[:20])
    with pytest.raises(ValueError, match="NaN"):
        clip_metrics(classifier, torch.full((20, 1, 8, 16, 16), float("nan")), real.labels[:20], ref)
    with pytest.raises(ValueError, match="N, 1, T, H, W"):
        clip_metrics(classifier, torch.zeros(20, 8, 16, 16), real.labels[:20], ref)


def test_evaluate_rows_and_table(capsys):
    cfg = EvalConfig(num_per_class=4, batch_size=16, num_real=100)
    calls = []

    def constant(labels, g):
        calls.append(len(labels))
        return torch.zeros(len(labels), 1, 8, 16, 16) - 1

    rows = evaluate({"data": data_generator("train"), "blank": constant}, cfg)
    assert [r["name"] for r in rows] == ["data", "blank"]
    assert calls == [16, 16, 8]
    data, blank = rows
    assert data["frame_accuracy"] > 0.9 and data["switching_share"] < 0.2 and blank["frame_accuracy"] < 0.5
    assert blank["frame_diversity"] == pytest.approx(0.0, abs=1e-9) and 0.7 < data["frame_diversity"] < 1.3
    assert data["frame_fd"] < blank["frame_fd"] and blank["sec_per_sample"] >= 0 and data["n"] == 40
    out = capsys.readouterr().out
    assert "blank" in out and "frame FD" in out


def test_train_classifier_tiny_run_saves_a_loadable_model(tmp_path):
    cfg = TrainClassifierConfig(out=tmp_path / "c.safetensors", steps=3, batch_size=8, width=4, feature_dim=8,
                                num_test=20, spec=ClipSpec(frames=4, size=12))
    model, acc = train_classifier(cfg)
    assert 0.0 <= acc <= 1.0
    loaded = load_classifier(cfg.out)
    x = torch.randn(3, 1, 4, 12, 12)
    assert torch.equal(loaded(x), model(x))
    assert loaded.features(x).shape == (3, 8)


def test_save_load_roundtrip_is_strict(tmp_path):
    m = DigitClassifier(width=4, feature_dim=8)
    save_classifier(m, tmp_path / "m.safetensors")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "m.safetensors"))
    sd.pop("head.bias")
    save_file(sd, str(tmp_path / "broken.safetensors"), metadata={"config": '{"width": 4, "feature_dim": 8, "num_classes": 10}'})
    with pytest.raises(RuntimeError, match="head.bias"):
        load_classifier(tmp_path / "broken.safetensors")
