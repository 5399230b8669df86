"""Helpers shared by the losses: explicit random draws, input checks, per-sample reductions."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_like", "check_sample", "draw_normal", "draw_uniform", "per_sample", "per_sample_sum"]


def draw_normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
                device: torch.device | str, name: str = "noise") -> Tensor:
    """ε ~ N(0, I) in fp32 (the reference's draw) from an explicit generator, moved to ``device``."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator to draw {name} "
                         f"(or pass {name} explicitly), got {type(generator).__name__}")
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device)


def draw_uniform(n: int, generator: torch.Generator | None, device: torch.device | str,
                 name: str = "t") -> Tensor:
    """u ~ U[0, 1) [n] in fp32 from an explicit generator, moved to ``device``."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator to draw {name} "
                         f"(or pass {name} explicitly), got {type(generator).__name__}")
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def per_sample(t: Tensor, x: Tensor) -> Tensor:
    """[B] → [B, 1, ..., 1], to broadcast a per-sample scalar over C, T, H, W of ``x``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def per_sample_sum(x: Tensor) -> Tensor:
    """Σ over every dim but the batch: [B, ...] → [B]."""
    return x.flatten(1).sum(1)


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def check_sample(x: Any, name: str) -> int:
    """A batch of samples is a floating tensor [B, ...] (B ≥ 1); returns B."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a floating tensor [B, C, ...], got {_describe(x)}")
    return x.shape[0]


def check_like(x: Any, ref: Tensor, name: str, ref_name: str) -> None:
    """``x`` is a floating tensor of the shape of ``ref``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape != ref.shape:
        raise ValueError(f"{name} must be a floating tensor of the shape of {ref_name} "
                         f"{tuple(ref.shape)}, got {_describe(x)}")


def draw_time_and_noise(x: Tensor, name: str, time_dist, generator: torch.Generator | None,
                        t: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """The draws of a loss at samples `x` [B, ...]: t [B] from `time_dist` (first), then ε like `x`, each from
    `generator` unless given; validated, returned in float64."""
    from rcm.models.trigflow import check_time

    batch = check_sample(x, name)
    if t is None:
        t = time_dist.sample(batch, generator, x.device)
    check_time(t, batch, "t")
    if noise is None:
        noise = draw_normal(x.shape, generator, x.device)
    check_like(noise, x, "noise", name)
    return t.to(torch.float64), noise.to(torch.float64)
