"""Known defects applied to real digit clips ``[N, 1, T, H, W]`` in [-1, 1]: the yardsticks that show what
each metric of ``rcm.digits.metrics`` responds to (the failure modes seen in distilled students).

- ``speckle``: isolated ink pixels scattered over every frame, independently per frame;
- ``switch_digit``: from frame ``at`` on, the clip shows another clip of a different digit;
- ``blur``: a Gaussian blur of every frame (soft strokes);
- ``freeze``: every frame is the first one (no motion).
All randomness comes from an explicit ``torch.Generator``; the input is not modified.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(clips: torch.Tensor) -> None:
    if clips.ndim != 5 or clips.shape[1] != 1:
        raise ValueError(f"clips must be [N, 1, T, H, W], got {tuple(clips.shape)}")


def speckle(clips: torch.Tensor, generator: torch.Generator, density: float = 0.02) -> torch.Tensor:
    """Each pixel of each frame independently becomes ink of random strength in [0.5, 1] (display
    range) with probability ``density``; where the digit is brighter it stays."""
    _check(clips)
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    hit = torch.rand(clips.shape, generator=generator) < density
    strength = 0.5 + 0.5 * torch.rand(clips.shape, generator=generator)  # display range
    return torch.where(hit, torch.maximum(clips, 2 * strength - 1), clips)


def switch_digit(clips: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, at: int | None = None) -> torch.Tensor:
    """Frames ``at..T-1`` (default: the second half) of each clip are replaced by the same frames of a
    random other clip of the batch with a different label (the digit, its hand and its path change)."""
    _check(clips)
    t = clips.shape[2]
    at = t // 2 if at is None else at
    if not 0 < at < t:
        raise ValueError(f"at must be in (0, {t}), got {at}")
    if labels.shape != (len(clips),) or len(labels.unique()) < 2:
        raise ValueError("switch_digit needs one label per clip and at least two different labels")
    out = clips.clone()
    for i in range(len(clips)):
        others = (labels != labels[i]).nonzero().flatten()
        j = others[torch.randint(len(others), (1,), generator=generator)].item()
        out[i, :, at:] = clips[j, :, at:]
    return out


def blur(clips: torch.Tensor, sigma: float | torch.Tensor = 0.8) -> torch.Tensor:
    """Gaussian blur (std ``sigma`` pixels, one value or one per clip ``[N]``; 5×5 kernel) of every frame,
    in the display range (the blank canvas beyond the edges)."""
    _check(clips)
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(len(clips))
    if not (sigma >= 0).all():
        raise ValueError(f"sigma must be >= 0, got {sigma.min().item()}")
    x = torch.arange(5, dtype=torch.float32) - 2
    k1 = torch.exp(-x.square() / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))  # σ → 0: the identity
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    n, _, t, h, w = clips.shape
    kernels = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(t, dim=0)[:, None]  # [N·T, 1, 5, 5]
    unit = ((clips.float() + 1) / 2).permute(0, 2, 1, 3, 4).reshape(1, n * t, h, w)
    out = F.conv2d(unit, kernels, padding=2, groups=n * t).reshape(n, t, 1, h, w).permute(0, 2, 1, 3, 4)
    return (out * 2 - 1).clamp(-1, 1)


def freeze(clips: torch.Tensor) -> torch.Tensor:
    """Every frame replaced by the clip's first frame."""
    _check(clips)
    return clips[:, :, :1].expand_as(clips).clone()
