"""Per-frame digit metrics: each one moves the way it should when real held-out clips are corrupted,
clean real clips score near-perfect, and the geometry under the metrics is exact on known inputs."""

import json
import math

import pytest
import torch


from rcm.digits.data import ClipSpec, DigitClips, bounce, render_clips
# ---
from rcm.digits import corruptions
from rcm.digits.metrics import (
    FRAME_CLASSIFIER_PATH,
    FrameReference,
    TrainFrameClassifierConfig,
    fit_bouncing_path,
    frame_metrics,
    ink,
    ink_centroids,
    load_frame_classifier,
    real_reference,
    stray_ink,
    train_frame_classifier,
)


@pytest.fixture(scope="module")
def reference() -> FrameReference:
    return real_reference(num_real=500, seed=1234)


@pytest.fixture(scope="module")
def scored(reference):
    """Metrics of 200 held-out real clips (not the reference's) and of each corruption of them."""
    real = DigitClips("test", 200, seed=7)
    g = torch.Generator().manual_seed(0)
    sets = {
        "clean": real.clips.clone(),
        "speckle": corruptions.speckle(real.clips, g),
        "switch": corruptions.switch_digit(real.clips, real.labels, g),
        "blur": corruptions.blur(real.clips),
        "freeze": corruptions.freeze(real.clips),
    }
    return {name: frame_metrics(clips, real.labels, reference) for name, clips in sets.items()}


def test_clean_real_clips_score_near_perfect(scored, reference):
    clean = scored["clean"]
    assert clean["frame_accuracy"] >= 0.95
    assert clean["switching_share"] <= 0.08
    assert clean["stray_ink"] < 1e-9  # a digit at a sub-pixel position fits its 9×9 window exactly
    assert clean["motion_residual"] < 0.05  # px; exactly 0 without the ink floor
    assert 0.9 < clean["speed_ratio"] < 1.1
    assert clean["shape_change"] < 1.3 * reference.real["shape_change"]
    assert 0.9 < clean["frame_diversity"] < 1.1
    # FD between two real sets is sampling noise: far below what any corruption scores
    assert clean["frame_fd"] < 0.2 * min(scored[k]["frame_fd"] for k in ("speckle", "blur"))


def test_speckle_is_seen_as_stray_ink_jitter_and_lower_quality(scored):
    clean, sp = scored["clean"], scored["speckle"]
    assert sp["stray_ink"] > 0.05
    assert sp["frame_fd"] > 4 * clean["frame_fd"]
    assert sp["shape_change"] > 3 * clean["shape_change"]
    assert sp["motion_residual"] > 0.15  # px: speckle drags the ink centroid around
    assert sp["frame_accuracy"] < clean["frame_accuracy"]


def test_a_digit_switched_mid_clip_is_seen_per_frame(scored):
    clean, sw = scored["clean"], scored["switch"]
    assert sw["frame_accuracy"] < 0.6  # half the frames show another digit
    assert sw["switching_share"] > 0.9
    assert sw["shape_change"] > 3 * clean["shape_change"]
    assert sw["motion_residual"] > 0.3  # the new digit does not continue the old path
    assert sw["stray_ink"] < 1e-9  # every frame is still one clean digit


def test_blur_is_seen_by_the_feature_distance(scored):
    clean, bl = scored["clean"], scored["blur"]
    assert bl["frame_fd"] > 8 * clean["frame_fd"]
    assert bl["stray_ink"] > clean["stray_ink"]  # soft edges spill out of the digit's window
    assert bl["motion_residual"] < 0.05  # the path is unchanged
    assert bl["frame_diversity"] < clean["frame_diversity"]  # blurred digits look more alike


def test_frozen_motion_is_seen_only_by_the_speed(scored):
    clean, fr = scored["clean"], scored["freeze"]
    assert fr["speed_ratio"] < 0.01
    assert fr["shape_change"] < 1e-9 and fr["motion_residual"] < 1e-6
    assert fr["frame_accuracy"] > clean["frame_accuracy"] - 0.03 and fr["stray_ink"] < 1e-9


def test_stray_ink_of_a_known_frame():
    unit = torch.zeros(1, 1, 1, 16, 16)
    unit[..., 2:11, 3:12] = 0.5  # 81 px × 0.5 of digit: exactly one 9×9 window
    unit[..., 15, 15] = 1.0  # one stray pixel
    frames = ink(unit * 2 - 1)
    digit, stray = 81 * (0.5 - 0.05) / 0.95, (1 - 0.05) / 0.95
    assert stray_ink(frames).item() == pytest.approx(stray / (digit + stray), rel=1e-6)  # float32 ink
    assert stray_ink(torch.zeros(1, 1, 16, 16)).item() == 0.0  # a blank frame has no stray ink


def test_centroid_follows_a_rendered_digit_exactly(monkeypatch):
    """Bilinear placement moves a digit's ink centroid by exactly its displacement (without the ink
    floor, which trims the faint fringe that sub-pixel placement makes)."""
    from rcm.digits import metrics

    monkeypatch.setattr(metrics, "INK_FLOOR", 0.0)
    digit = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))
    starts = torch.tensor([[0.0, 0.0], [2.25, 5.5], [7.9, 3.3], [8.0, 8.0]])
    clips = render_clips(digit.expand(4, 8, 8), starts, torch.zeros(4, 2), ClipSpec(frames=1))
    shift = ink_centroids(ink(clips))[:, 0] - starts.double()
    assert torch.allclose(shift, shift[:1].expand(4, 2), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bouncing_path_fit_is_exact_on_the_law_and_sees_deviations(seed):
    g = torch.Generator().manual_seed(seed)
    m, t, hi = 64, 8, 8.0
    offset, phase, speed = torch.rand(m, generator=g) * 5, torch.rand(m, generator=g) * 2 * hi, torch.rand(m, generator=g) * 1.5
    track = offset[:, None].double() + bounce(phase[:, None].double() + torch.arange(t) * speed[:, None].double(), hi)
    rms, fitted = fit_bouncing_path(track, hi)
    assert rms.max().item() < 1e-9
    assert torch.allclose(fitted, speed.double(), atol=1e-9)
    jitter = 0.3 * torch.randn(m, t, generator=g, dtype=torch.float64)
    rms_jittered, _ = fit_bouncing_path(track + jitter, hi)
    assert rms_jittered.mean().item() > 0.1  # 3 parameters cannot absorb 8 frames of jitter
    jump = track.clone()
    jump[:, t // 2 :] += 2.0  # the path breaks mid-clip (a bounce can explain it now and then)
    rms_jump, _ = fit_bouncing_path(jump, hi)
    assert rms_jump.mean().item() > 0.3 and (rms_jump > 0.1).double().mean().item() > 0.9


def test_bad_arguments_are_named(reference):
    clips, labels = DigitClips("test", 4, seed=0).clips, torch.arange(4)
    with pytest.raises(ValueError, match="clips"):
        frame_metrics(clips[:, 0], labels, reference)
    with pytest.raises(ValueError, match="labels"):
        frame_metrics(clips, labels[:3], reference)
    with pytest.raises(ValueError, match="NaN"):
        frame_metrics(clips.clone().fill_(math.nan), labels, reference)
    with pytest.raises(ValueError, match="density"):
        corruptions.speckle(clips, torch.Generator(), density=2.0)


def test_shipped_frame_classifier_is_small_and_documented():
    from safetensors import safe_open

    assert FRAME_CLASSIFIER_PATH.stat().st_size < 1_000_000
    with safe_open(str(FRAME_CLASSIFIER_PATH), "pt") as f:
        meta = f.metadata()
    assert float(meta["test_frame_accuracy"]) >= 0.97
    assert "python3 -m rcm.digits.metrics" in meta["reproduce"]
    recipe = json.loads(meta["recipe"])
    assert recipe["steps"] == TrainFrameClassifierConfig().steps


def test_training_saves_a_loadable_classifier(tmp_path):
    cfg = TrainFrameClassifierConfig(out=tmp_path / "c.safetensors", steps=3, batch_size=16, width=4, feature_dim=8,
                                     num_test=10, log_every=1)
    model, acc = train_frame_classifier(cfg, log=lambda s: None)
    loaded = load_frame_classifier(cfg.out)
    x = DigitClips("test", 2, seed=0).clips[:, :, 0]
    assert torch.equal(loaded(x), model(x))
    assert 0.0 <= acc <= 1.0
