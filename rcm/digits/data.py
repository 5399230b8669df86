"""Moving-digit video clips: the embedded default's data, made from scikit-learn's bundled digits.

Each clip shows one real 8×8 handwritten digit (``sklearn.datasets.load_digits``, 1,797 images,
no download) gliding across a ``size×size`` canvas for ``frames`` frames with constant velocity,
bouncing off the walls. Positions are continuous; the digit is placed with bilinear interpolation,
so the motion is smooth at sub-pixel speed. The label is the digit.

Layout for the models: ``[N, C=1, T, H, W]`` float32, background −1, ink up to +1.

Split: a fixed, class-stratified split *by source image* (``TEST_FRACTION`` of each class held out,
independent of any data seed), so train and test clips never share a handwritten digit.

Everything random is drawn from an explicit ``torch.Generator``:
- ``sample_clips(split, n, generator)``: a fresh batch;
- ``DigitClips(split, n, seed)``: a fixed, reproducible set (e.g. the held-out reference set);
- ``ClipBatches(split, batch_size, seed)``: an infinite training iterator whose position
  (``state_dict()`` / ``load_state_dict()``) can be saved and restored for exact resume.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from rcm.digits.config import DIGIT_SIZE, NUM_CLASSES, ClipSpec

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split is part of the dataset's definition, not of a run


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = torch.tensor(d.target, dtype=torch.long)
    return images, labels


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> torch.Tensor:
    """Indices into ``load_digits()`` of the source images of ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = _all_digits()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[: round(TEST_FRACTION * len(idx))])
    test = torch.cat(test).sort().values
    if split == "test":
        return test
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().flatten()


def digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 8, 8] in [0, 1], labels [N])`` of the source digits of ``split``."""
    images, labels = _all_digits()
    idx = split_indices(split)
    return images[idx], labels[idx]


def bounce(p: torch.Tensor, hi: float) -> torch.Tensor:
    """Reflect positions into ``[0, hi]`` (a triangle wave: constant speed, elastic walls)."""
    if hi <= 0:
        return torch.zeros_like(p)
    m = torch.remainder(p, 2 * hi)
    return torch.where(m <= hi, m, 2 * hi - m)


def render_clips(digits: torch.Tensor, start: torch.Tensor, velocity: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """Render clips ``[N, 1, T, H, W]`` in [-1, 1].

    digits: ``[N, 8, 8]`` in [0, 1]; start, velocity: ``[N, 2]`` as (y, x) in pixels and pixels/frame.
    The digit's top-left corner is at ``bounce(start + t·velocity)``, placed bilinearly.
    """
    n, t_len, s = digits.shape[0], spec.frames, spec.size
    hi = float(s - DIGIT_SIZE)
    t = torch.arange(t_len, dtype=torch.float32)
    pos = bounce(start[:, None, :] + t[None, :, None] * velocity[:, None, :], hi)  # [N, T, 2]
    pix = torch.arange(s, dtype=torch.float32)
    # sample the digit at canvas pixel minus position, in the digit's own pixel coordinates
    v = pix[None, None, :] - pos[..., 0:1]  # [N, T, S] (rows)
    u = pix[None, None, :] - pos[..., 1:2]  # [N, T, S] (cols)
    grid = torch.stack(torch.broadcast_tensors(u[:, :, None, :], v[:, :, :, None]), dim=-1)  # [N,T,S,S,2]=(x,y)
    grid = grid / (DIGIT_SIZE - 1) * 2 - 1  # align_corners=True normalisation
    src = digits[:, None].expand(n, t_len, DIGIT_SIZE, DIGIT_SIZE).reshape(n * t_len, 1, DIGIT_SIZE, DIGIT_SIZE)
    out = F.grid_sample(src, grid.reshape(n * t_len, s, s, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out.reshape(n, 1, t_len, s, s) * 2 - 1).clamp(-1, 1)


def sample_clips(
    split: str,
    n: int,
    generator: torch.Generator,
    spec: ClipSpec = ClipSpec(),
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` clips ``[n, 1, T, H, W]`` and their labels ``[n]`` from ``split``.

    Source images are drawn uniformly from the split, or, if ``labels`` is given, uniformly among
    the split's images of each requested class. Start position, speed and direction are uniform.
    """
    images, image_labels = digit_images(split)
    if labels is None:
        idx = torch.randint(len(images), (n,), generator=generator)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.empty(n, dtype=torch.long)
        for c in range(NUM_CLASSES):
            pool = (image_labels == c).nonzero().flatten()
            sel = labels == c
            idx[sel] = pool[(u[sel] * len(pool)).long().clamp_max(len(pool) - 1)]
    hi = spec.size - DIGIT_SIZE
    start = torch.rand(n, 2, generator=generator) * hi
    speed = spec.min_speed + (spec.max_speed - spec.min_speed) * torch.rand(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    velocity = speed[:, None] * torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    return render_clips(images[idx], start, velocity, spec), image_labels[idx]


class DigitClips(torch.utils.data.Dataset):
    """A fixed, reproducible set of ``n`` clips of ``split`` (class-balanced if ``balanced``)."""

    def __init__(self, split: str = "test", n: int = 1000, seed: int = 0, spec: ClipSpec = ClipSpec(), balanced: bool = True):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % NUM_CLASSES if balanced else None
        self.split, self.seed, self.spec = split, seed, spec
        self.clips, self.labels = sample_clips(split, n, g, spec, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.clips[i], self.labels[i]


class ClipBatches:
    """Infinite iterator of training batches ``(clips [B,1,T,H,W], labels [B])``.

    All randomness comes from one ``torch.Generator`` seeded with ``seed``; ``state_dict()``
    captures its state and the step count, so a resumed run sees exactly the same batches.
    """

    def __init__(self, split: str = "train", batch_size: int = 32, seed: int = 0, spec: ClipSpec = ClipSpec()):
        self.split, self.batch_size, self.spec = split, batch_size, spec
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = sample_clips(self.split, self.batch_size, self.generator, self.spec)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def to_unit(clips: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] → display range [0, 1] (clamped)."""
    return ((clips + 1) / 2).clamp(0, 1)


def clip_grid(clips: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4):
    """A uint8 image ``[H', W']`` (numpy) of clips ``[N, 1, T, H, W]`` in [-1, 1]: one clip per row,
    frames left to right (``nrow`` clips per row-block if given, blocks side by side), each pixel
    ``scale``×``scale``, separated by ``pad`` grey pixels."""
    x = to_unit(clips.detach().float().cpu())[:, 0]  # [N, T, H, W]
    n, t, h, w = x.shape
    nrow = nrow or n
    ncol_blocks = math.ceil(n / nrow)
    cell_h, cell_w = h + pad, w + pad
    block_w = t * cell_w + pad
    img = torch.full((nrow * cell_h + pad, ncol_blocks * block_w + pad), 0.5)
    for i in range(n):
        r, b = i % nrow, i // nrow
        for j in range(t):
            y0, x0 = pad + r * cell_h, b * block_w + pad + j * cell_w
            img[y0 : y0 + h, x0 : x0 + w] = x[i, j]
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (img * 255).round().to(torch.uint8).numpy()
