"""Helpers shared by the losses: explicit random draws, input checks, per-sample reductions."""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from rcm.models.trigflow import check_time, check_time_range

__all__ = [
    "check_callable",
    "check_config",
    "check_context",
    "check_count",
    "check_like",
    "check_sample",
    "draw_normal",
    "draw_uniform",
    "per_sample_sum",
]


def check_count(value: Any, name: str, minimum: int = 0) -> int:
    """An integer (a Python or NumPy int, not a bool or a float such as 1.5) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_callable(net: Any, name: str) -> None:
    """A network (or any function the loss calls) is callable."""
    if not callable(net):
        raise ValueError(f"{name} must be callable (a network net(x, timestep, context) -> v), "
                         f"got {type(net).__name__}")


def check_config(config: Any, cls: type, name: str = "config") -> None:
    if not isinstance(config, cls):
        raise ValueError(f"{name} must be a {cls.__name__}, got {type(config).__name__}")


def _check_generator(generator: Any, name: str) -> None:
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator to draw {name} "
                         f"(or pass {name} explicitly), got {type(generator).__name__}")


def draw_normal(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None,
                device: torch.device | str, name: str = "noise") -> Tensor:
    """ε ~ N(0, I) in fp32 (the reference's draw) from an explicit generator, moved to ``device``."""
    _check_generator(generator, name)
    shape = tuple(shape)
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0 for n in shape):
        raise ValueError(f"the shape of {name} must be non-negative ints, got {shape}")
    z = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return z.to(device)


def draw_uniform(n: int, generator: torch.Generator | None, device: torch.device | str,
                 name: str = "t") -> Tensor:
    """u ~ U[0, 1) [n] in fp32 from an explicit generator, moved to ``device``."""
    _check_generator(generator, name)
    n = check_count(n, f"the number of {name} draws")
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def per_sample_sum(x: Tensor) -> Tensor:
    """Σ over every dim but the batch: [B, ...] → [B]."""
    return x.flatten(1).sum(1)


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__


def check_sample(x: Any, name: str) -> int:
    """A batch of samples is a floating tensor [B, ...] (B ≥ 1); returns B."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a floating tensor [B, C, ...], got {_describe(x)}")
    return x.shape[0]


def check_like(x: Any, ref: Tensor, name: str, ref_name: str) -> None:
    """``x`` is a floating tensor of the shape of ``ref``, on its device."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape != ref.shape or x.device != ref.device:
        raise ValueError(f"{name} must be a floating tensor of the shape of {ref_name} "
                         f"{tuple(ref.shape)} on {ref.device}, got {_describe(x)}")


def check_context(context: Any, x: Tensor, name: str, x_name: str) -> None:
    """A tensor context (labels [B], text embeddings [B, L, D]) has one entry per sample of ``x``, on its
    device; other contexts (None, tuples, dicts) are the network's business."""
    if isinstance(context, Tensor) and (context.ndim < 1 or context.shape[0] != x.shape[0]
                                        or context.device != x.device):
        raise ValueError(f"{name} must have one entry per sample of {x_name} (batch {x.shape[0]}, on "
                         f"{x.device}), got {_describe(context)}")


def draw_time_and_noise(x: Tensor, name: str, time_dist, generator: torch.Generator | None,
                        t: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """The draws of a loss at samples `x` [B, ...]: t [B] from `time_dist` (first), then ε like `x`, each from
    `generator` unless given; validated (t in [0, π/2]), returned in float64."""
    batch = check_sample(x, name)
    if t is None:
        t = time_dist.sample(batch, generator, x.device)
    check_time(t, batch, "t")
    if t.device != x.device:
        raise ValueError(f"t must be on the device of {name} ({x.device}), got {t.device}")
    check_time_range(t, "t")
    if noise is None:
        noise = draw_normal(x.shape, generator, x.device)
    check_like(noise, x, "noise", name)
    return t.to(torch.float64), noise.to(torch.float64)
