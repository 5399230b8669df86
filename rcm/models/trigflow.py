"""TrigFlow ⇄ rectified-flow wrapper (RCM_METHOD.md §1).

One noise level, three clocks:

    TrigFlow  t ∈ [0, π/2]  x_t = cos t · x0 + sin t · ε    PF-ODE dx_t/dt = F = cos t · ε − sin t · x0
    RF        ρ ∈ [0, 1]    x_ρ = (1 − ρ) x0 + ρ ε          (Wan's "sigma"); network v ≈ ε − x0 from (x_ρ, 1000ρ)
    EDM       σ = tan t     (σ_d = 1)

    ρ = σ/(1 + σ) = sin t/(cos t + sin t),   x_ρ = x_t/(cos t + sin t)

``trigflow_denoise`` turns a Wan velocity network into the TrigFlow denoiser with EDM-style scalings
(c_in = c_skip = 1/(c+s), c_out = −s/(c+s), c_noise = 1000 s/(c+s)):

    x̂0 = c_skip x_t + c_out v = (x_t − s v)/(c + s)
    F   = (c x_t − x̂0)/s      = ((c − s) x_t + v)/(c + s)      (closed form, no division by s)

The consistency function is f(x_t, t) = c x_t − s F = x̂0. All wrapper math is float64; the network
sees its own dtype. The whole denoiser (wrapper + network) is differentiable and ``torch.func.jvp``-able
jointly in (x_t, t), which is what the sCM tangent needs.

A *network* is anything called as ``net(x, timestep, context) -> v``: an ``nn.Module`` such as
``rcm.models.wan.WanDiT``, a ``FunctionalNet`` (module + explicit params for ``torch.func``), a
``GuidedNet`` (classifier-free guidance), or a plain function (analytic fields in tests).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "RF_TIMESTEP_SCALE",
    "Denoised",
    "FunctionalNet",
    "GuidedNet",
    "TrigFlowScalings",
    "check_time",
    "classifier_free_guidance",
    "network_dtype",
    "network_velocity",
    "rf_to_sigma",
    "rf_to_trig",
    "shift_rf_time",
    "sigma_to_rf",
    "sigma_to_trig",
    "trig_to_rf",
    "trig_to_sigma",
    "trigflow_denoise",
    "trigflow_scalings",
]

RF_TIMESTEP_SCALE = 1000.0  # Wan's network time input is 1000·ρ

TimeLike = Union[Tensor, float]


# ------------------------------------------------------------------------------------------------
# Time maps (RCM_METHOD.md §1.3). Tensors in, tensors out; a Python float becomes a float64 scalar.


def _as_tensor(x: TimeLike) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)


def sigma_to_rf(sigma: TimeLike) -> Tensor:
    """ρ = σ/(1 + σ)."""
    sigma = _as_tensor(sigma)
    return sigma / (1 + sigma)


def rf_to_sigma(rho: TimeLike) -> Tensor:
    """σ = ρ/(1 − ρ), with ρ clamped to [0, 1 − ε_dtype] so that ρ = 1 stays finite (t < π/2)."""
    rho = _as_tensor(rho)
    rho = rho.clamp(0.0, 1.0 - torch.finfo(rho.dtype).eps)
    return rho / (1 - rho)


def sigma_to_trig(sigma: TimeLike) -> Tensor:
    """t = arctan σ (σ = inf gives π/2)."""
    return torch.atan(_as_tensor(sigma))


def trig_to_sigma(t: TimeLike) -> Tensor:
    """σ = tan t."""
    return torch.tan(_as_tensor(t))


def rf_to_trig(rho: TimeLike) -> Tensor:
    """t = arctan(ρ/(1 − ρ)), through the clamped ``rf_to_sigma``."""
    return torch.atan(rf_to_sigma(rho))


def trig_to_rf(t: TimeLike) -> Tensor:
    """ρ = sin t/(sin t + cos t) (= tan t/(1 + tan t), finite at t = π/2)."""
    t = _as_tensor(t)
    s = torch.sin(t)
    return s / (s + torch.cos(t))


def shift_rf_time(rho: TimeLike, shift: float) -> Tensor:
    """Wan's time shift ρ' = Sρ/(1 + (S − 1)ρ); identity for S ≤ 0. Its inverse is a shift by 1/S."""
    rho = _as_tensor(rho)
    if shift <= 0:
        return rho
    return shift * rho / (1 + (shift - 1) * rho)


# ------------------------------------------------------------------------------------------------
# Denoiser (RCM_METHOD.md §1.4)


class TrigFlowScalings(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def trigflow_scalings(t: Tensor) -> TrigFlowScalings:
    """EDM-style preconditioning of a Wan RF network in TrigFlow time, in float64 (shape of ``t``)."""
    t = t.to(torch.float64)
    c, s = torch.cos(t), torch.sin(t)
    c_in = 1 / (c + s)  # x_ρ = x_t/(c + s)
    return TrigFlowScalings(c_skip=c_in, c_out=-s / (c + s), c_in=c_in,
                            c_noise=RF_TIMESTEP_SCALE * s / (c + s))  # = 1000·ρ


class Denoised(NamedTuple):
    """Denoiser outputs at (x_t, t), float64: ``x0`` = x̂0 = f(x_t, t), ``F`` = dx_t/dt."""

    x0: Tensor
    F: Tensor


def network_dtype(net: Any) -> torch.dtype | None:
    """The dtype a network computes in: its ``dtype`` attribute, else its first floating parameter;
    ``None`` for a parameterless callable (its input then stays float64)."""
    dtype = getattr(net, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(net, nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return None


def network_velocity(net: Callable, x: Tensor, timestep: Tensor, context: Any) -> Tensor:
    """``v = net(x, timestep, context)`` under the precision policy; returns float64.

    ``x`` is cast to the network's dtype (bf16 on GPU). ``timestep`` (c_noise = 1000ρ) goes in at
    least fp32: the reference rounds it to bf16 too, which is ``WanConfig.bf16_timestep``, the
    network's own flag. The output goes to fp32 (the reference's cast), then float64.
    """
    dtype = network_dtype(net)
    if dtype is not None:
        x = x.to(dtype)
        timestep = timestep.to(torch.promote_types(dtype, torch.float32))
    v = net(x, timestep, context)
    return v.to(torch.promote_types(v.dtype, torch.float32)).to(torch.float64)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """[B] → [B, 1, ..., 1] to broadcast over C, T, H, W."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def check_time(t: Any, batch_size: int, name: str = "t") -> None:
    """A time is a floating tensor [B]: one per sample."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim != 1 or t.shape[0] != batch_size:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor of shape [B]=[{batch_size}] (one time per "
                         f"sample), got {got}")


def trigflow_denoise(net: Callable, x_t: Tensor, t: Tensor, context: Any) -> Denoised:
    """x̂0 and F of network ``net`` at TrigFlow state ``x_t`` [B, ...] and time ``t`` [B] (float64)."""
    if not isinstance(x_t, Tensor) or not x_t.is_floating_point() or x_t.ndim < 2:
        raise ValueError(f"x_t must be a floating tensor [B, ...], got "
                         f"{tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__}")
    check_time(t, x_t.shape[0], "t")
    x_t, t = x_t.to(torch.float64), t.to(torch.float64)
    c_skip, c_out, c_in, c_noise = trigflow_scalings(t)
    v = network_velocity(net, _per_sample(c_in, x_t) * x_t, c_noise, context)
    c, s = _per_sample(torch.cos(t), x_t), _per_sample(torch.sin(t), x_t)
    x0 = _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * v
    F = ((c - s) * x_t + v) / (c + s)  # = (c x_t − x̂0)/s without the cancellation at small s
    return Denoised(x0=x0, F=F)


# ------------------------------------------------------------------------------------------------
# Networks: functional calls and classifier-free guidance


class FunctionalNet(NamedTuple):
    """``module`` evaluated on explicit ``params`` (and ``buffers``) through ``torch.func.functional_call``,
    so losses are pure functions of parameter dicts. Missing names fall back to the module's own."""

    module: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor] | None = None

    def __call__(self, x: Tensor, timestep: Tensor, context: Any) -> Tensor:
        return functional_call(self.module, (dict(self.params), dict(self.buffers or {})),
                               (x, timestep, context))

    @property
    def dtype(self) -> torch.dtype | None:
        for p in self.params.values():
            if p.is_floating_point():
                return p.dtype
        return network_dtype(self.module)


class GuidedNet(NamedTuple):
    """Classifier-free guidance on the velocity: v = v_u + w (v_c − v_u), combined in float64.

    x̂0 and F are affine in v with the same coefficients, so this is also CFG on x̂0 and on F
    (the reference's form, RCM_METHOD.md §2.2, §3.3). Build with ``classifier_free_guidance``."""

    net: Callable
    negative_context: Any
    guidance: float

    def __call__(self, x: Tensor, timestep: Tensor, context: Any) -> Tensor:
        v_cond = self.net(x, timestep, context).to(torch.float64)
        v_uncond = self.net(x, timestep, self.negative_context).to(torch.float64)
        return v_uncond + self.guidance * (v_cond - v_uncond)

    @property
    def dtype(self) -> torch.dtype | None:
        return network_dtype(self.net)


def classifier_free_guidance(net: Callable, guidance: float, negative_context: Any) -> Callable:
    """``net`` guided with weight ``guidance`` against ``negative_context`` (the negative prompt).

    Guidance applies only for w > 1 (the reference's rule); w ≤ 1 returns ``net`` unchanged
    (conditional only). A missing negative context with w > 1 is an error: the reference silently
    turns CFG off in that case (RCM_METHOD.md §10.11).
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    if guidance <= 1:
        return net
    if negative_context is None:
        raise ValueError(f"negative_context is required for classifier-free guidance {guidance} > 1 "
                         f"(pass the negative-prompt embedding, or guidance=1 to disable CFG)")
    return GuidedNet(net, negative_context, float(guidance))
