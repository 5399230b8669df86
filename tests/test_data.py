import torch
import pytest

from rcm.digits.data import (
    NUM_CLASSES,
    ClipBatches,
    ClipSpec,
    DigitClips,
    bounce,
    clip_grid,
    digit_images,
    render_clips,
    sample_clips,
    split_indices,
)


def test_split_is_disjoint_stratified_and_covers_all_images():
    train, test = split_indices("train"), split_indices("test")
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert len(train) + len(test) == 1797
    _, test_labels = digit_images("test")
    counts = torch.bincount(test_labels, minlength=NUM_CLASSES)
    assert counts.min() >= 30 and counts.max() <= 40  # ~20% of ~180 per class
    # the split is part of the dataset: independent of any data seed
    assert torch.equal(split_indices("test"), test)


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="split"):
        split_indices("val")


def test_clips_come_from_their_split():
    """Every test clip's first frame matches a test source image placed on the canvas, not a train one."""
    spec = ClipSpec(frames=1, size=8)  # canvas = digit: no room to move, so the clip *is* the image
    clips, labels = sample_clips("test", 64, torch.Generator().manual_seed(0), spec)
    test_imgs, test_labels = digit_images("test")
    train_imgs, _ = digit_images("train")
    frames = (clips[:, 0, 0] + 1) / 2
    d_test = torch.cdist(frames.flatten(1), test_imgs.flatten(1)).min(1)
    d_train = torch.cdist(frames.flatten(1), train_imgs.flatten(1)).min(1).values
    assert d_test.values.max() < 1e-5
    assert torch.equal(test_labels[d_test.indices], labels)
    assert d_train.min() > 1e-3


def test_shapes_range_and_determinism():
    spec = ClipSpec(frames=8, size=16)
    a = DigitClips("train", 30, seed=3, spec=spec)
    b = DigitClips("train", 30, seed=3, spec=spec)
    c = DigitClips("train", 30, seed=4, spec=spec)
    assert a.clips.shape == (30, 1, 8, 16, 16) and a.clips.dtype == torch.float32
    assert a.clips.min() >= -1 and a.clips.max() <= 1 and a.clips.max() > 0.5
    assert torch.equal(a.clips, b.clips) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.clips, c.clips)
    assert torch.equal(a.labels, torch.arange(30) % NUM_CLASSES)  # balanced by default
    x, y = a[4]
    assert x.shape == (1, 8, 16, 16) and y.item() == 4


def test_requested_labels_are_honoured():
    labels = torch.tensor([7, 7, 0, 3, 9])
    _, out = sample_clips("test", 5, torch.Generator().manual_seed(1), labels=labels)
    assert torch.equal(out, labels)
    with pytest.raises(ValueError):
        sample_clips("test", 2, torch.Generator(), labels=torch.tensor([1, 10]))


def test_motion_is_smooth_and_preserves_ink():
    """Constant velocity, sub-pixel placement: the ink's centre of mass moves by ≈ the speed each
    frame (away from the walls) and the total ink is conserved frame to frame."""
    img = digit_images("train")[0][:1]
    spec = ClipSpec(frames=6, size=24)
    clip = render_clips(img, torch.tensor([[2.0, 3.0]]), torch.tensor([[0.6, 1.1]]), spec)
    ink = (clip[0, 0] + 1) / 2  # [T, H, W]
    mass = ink.sum((1, 2))
    assert torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-4)
    ys, xs = torch.arange(24.0)[:, None], torch.arange(24.0)[None, :]
    com = torch.stack([(ink * ys).sum((1, 2)), (ink * xs).sum((1, 2))], 1) / mass[:, None]
    step = com.diff(dim=0)
    assert torch.allclose(step, torch.tensor([0.6, 1.1]).expand_as(step), atol=1e-3)


def test_bounce_reflects_at_walls():
    p = torch.tensor([-1.0, 0.0, 3.0, 8.0, 9.5, 16.0, 17.0])
    assert torch.allclose(bounce(p, 8.0), torch.tensor([1.0, 0.0, 3.0, 8.0, 6.5, 0.0, 1.0]))


def test_batches_resume_exactly():
    it = ClipBatches("train", batch_size=4, seed=0)
    next(it), next(it)
    state = it.state_dict()
    expected = [next(it) for _ in range(2)]
    resumed = ClipBatches("train", batch_size=4, seed=123)
    resumed.load_state_dict(state)
    assert resumed.step == 2
    for (x, y), (x2, y2) in zip(expected, [next(resumed) for _ in range(2)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    fresh = ClipBatches("train", batch_size=4, seed=0)
    assert torch.equal(next(fresh)[0], ClipBatches("train", batch_size=4, seed=0).__next__()[0])
    assert not torch.equal(next(fresh)[0], expected[0][0])  # step 1 differs from step 2


def test_clip_grid_layout():
    clips = DigitClips("test", 4, seed=0, spec=ClipSpec(frames=3, size=8)).clips
    img = clip_grid(clips, nrow=2, pad=1, scale=2)
    # 2 rows of (8+1) + 1 pad; 2 blocks of 3 frames of (8+1) + 1 pad, + 1 pad
    assert img.shape == ((2 * 9 + 1) * 2, (2 * (3 * 9 + 1) + 1) * 2)
    assert img.dtype.name == "uint8" and img.max() == 255
