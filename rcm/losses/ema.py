"""EDM2 power-function EMA (docs/method.md §4), σ_rel = 0.1.

    γ: largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²)      (σ_rel = 0.1 → γ ≈ 6.9372)
    β(n) = (1 − 1/(n + 1))^(γ + 1), β = 0 for n < 1                         (n = k_S, student iterations)
    θ_ema ← β θ_ema + (1 − β) θ                                              after each student step
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Union

import numpy as np
import torch
from torch import Tensor, nn

from rcm.losses.common import check_count

__all__ = ["ema_update_", "power_ema_beta", "power_ema_gamma"]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def power_ema_gamma(sigma_rel: float = 0.1) -> float:
    """The power-function exponent γ whose EMA has relative standard deviation ``sigma_rel``."""
    if not _is_real(sigma_rel) or not sigma_rel > 0:
        raise ValueError(f"sigma_rel must be a finite number > 0, got {sigma_rel!r}")
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    gamma = float(roots[np.abs(roots.imag) < 1e-9].real.max())
    if not gamma > -1:  # the power-function profile needs γ > −1
        raise ValueError(f"sigma_rel={sigma_rel} is too large for a power-function EMA (γ = {gamma:.4g} ≤ −1)")
    return gamma


def power_ema_beta(n: int, gamma: float) -> float:
    """β(n) = (1 − 1/(n + 1))^(γ + 1) after n student steps; 0 for n < 1 (the EMA copies θ)."""
    n = check_count(n, "n")
    if not _is_real(gamma) or not gamma > -1:
        raise ValueError(f"gamma must be a finite number > -1 (a power-function profile), got {gamma!r}")
    if n < 1:
        return 0.0
    return (1.0 - 1.0 / (n + 1)) ** (gamma + 1)


Weights = Union[nn.Module, Mapping[str, Tensor]]


def _tensors(weights: Weights, name: str) -> dict[str, Tensor]:
    if isinstance(weights, nn.Module):
        return {**dict(weights.named_parameters()), **dict(weights.named_buffers())}
    if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
        raise ValueError(f"{name} must be an nn.Module or a mapping of names to tensors, got {type(weights).__name__}")
    return dict(weights)


@torch.no_grad()
def ema_update_(ema: Weights, live: Weights, beta: float) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ, in place, over two modules or two name→tensor dicts.

    Floating tensors are averaged in the EMA's dtype (fp32 EMA of bf16 live weights, as the
    reference); other tensors (integer buffers) are copied. Names must match exactly."""
    if not _is_real(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    ema_t, live_t = _tensors(ema, "ema"), _tensors(live, "live")
    if ema_t.keys() != live_t.keys():
        missing, extra = sorted(live_t.keys() - ema_t.keys()), sorted(ema_t.keys() - live_t.keys())
        raise ValueError(f"ema and live weights differ: missing in ema {missing[:5]}, extra in ema {extra[:5]}")
    averaged, targets = [], []
    for name, e in ema_t.items():
        w = live_t[name]
        if e.shape != w.shape:
            raise ValueError(f"ema[{name!r}] has shape {tuple(e.shape)}, live has {tuple(w.shape)}")
        if e.device != w.device:
            raise ValueError(f"ema[{name!r}] is on {e.device}, live on {w.device}")
        if e.is_floating_point():
            averaged.append(e)
            targets.append(w.to(e.dtype))
        else:
            e.copy_(w)
    if averaged:
        torch._foreach_lerp_(averaged, targets, 1.0 - beta)
