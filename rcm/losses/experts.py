"""Boundary consistency of a two-expert student (docs/method.md §12.3).

The sCM loss is local in t: it makes each expert student's consistency function f constant along the
teacher's ODE within its own time range, and never compares the two at the switch. This term does:

    t_b = arctan(ρ_b/(1 − ρ_b)),  x_b = c_b x0 + s_b ε
    L_b = λ_b · Σ (f_high(x_b, t_b) − sg f_low(x_b, t_b))² / N        N: generated positions per sample

the limit of a discrete consistency pair straddling the boundary (both sides see the same state). The low
student, anchored by f(x, 0) = x, is the target; the gradient goes into the high student only.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from rcm.losses.common import check_context, check_sample, draw_normal, per_sample_sum
from rcm.models.trigflow import (
    FrameCondition,
    TimeSwitchedNet,
    per_sample,
    rf_to_trig,
    trigflow_denoise,
)

__all__ = ["expert_boundary_loss"]


def expert_boundary_loss(student: TimeSwitchedNet, x0: Tensor, context: Any, *, loss_scale: float = 1.0,
                         generator: torch.Generator | None = None, noise: Tensor | None = None,
                         condition: FrameCondition | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample boundary loss [B] (float64) of a ``TimeSwitchedNet`` student, and diagnostics.

    x0: clean data [B, C, T, H, W]; noise (shape of x0): ε, drawn from ``generator`` when not given.
    ``condition`` (§12): of both calls; under frame replacement the given frames are excluded.
    A sample with any non-finite value gets loss and gradient exactly 0. Diagnostics (detached):
    ``gap`` [B], the root-mean-square of f_high − f_low over the generated positions.
    """
    if not isinstance(student, TimeSwitchedNet):
        raise ValueError(f"student must be a TimeSwitchedNet (one student per expert), got {type(student).__name__}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, numbers.Real) or not math.isfinite(loss_scale) \
            or loss_scale < 0:
        raise ValueError(f"loss_scale must be a finite number >= 0, got {loss_scale!r}")
    batch = check_sample(x0, "x0")
    check_context(context, x0, "context", "x0")
    if noise is None:
        noise = draw_normal(x0.shape, generator, x0.device)
    if not isinstance(noise, Tensor) or noise.shape != x0.shape:
        raise ValueError(f"noise must be a tensor of the shape of x0 {tuple(x0.shape)}")
    condition = FrameCondition() if condition is None else condition.checked(x0)
    t_b = rf_to_trig(torch.full((batch,), float(student.boundary), dtype=torch.float64, device=x0.device))
    x_b = per_sample(torch.cos(t_b), x0) * x0.to(torch.float64) + per_sample(torch.sin(t_b), x0) * noise.to(torch.float64)
    x_b = condition.impose(x_b)
    with torch.no_grad():
        f_low = trigflow_denoise(student.low, x_b, t_b, context, name="student (low)", condition=condition).x0
    f_high = trigflow_denoise(student.high, x_b, t_b, context, name="student (high)", condition=condition).x0
    residual = condition.exclude(f_high - f_low)
    finite = torch.isfinite(residual.detach()).flatten(1).all(1)
    residual = torch.where(per_sample(finite, residual), residual, 0.0)
    mean_square = per_sample_sum(residual ** 2) / condition.generated_count(x0)
    return loss_scale * mean_square, {"gap": mean_square.detach().sqrt(), "nonfinite": (~finite).sum()}
