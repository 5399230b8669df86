"""TrigFlow ⇄ rectified-flow wrapper (docs/method.md §1).

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

A *network* is anything called as ``net(x, timestep, context, **inputs) -> v``: an ``nn.Module`` such
as ``rcm.models.wan.WanDiT``, a ``FunctionalNet`` (module + explicit params for ``torch.func``), a
``GuidedNet`` (classifier-free guidance), a ``TimeSwitchedNet`` (two experts split at an RF time), or a
plain function (analytic fields in tests). ``inputs`` (keyword tensors such as ``y``, ``image_context``)
and per-frame timesteps come only from a ``FrameCondition`` (image-to-video, docs/method.md §12).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "RF_TIMESTEP_SCALE",
    "Denoised",
    "FrameCondition",
    "FunctionalNet",
    "GuidedNet",
    "TimeSwitchedNet",
    "TrigFlowScalings",
    "check_time",
    "check_time_range",
    "classifier_free_guidance",
    "network_dtype",
    "network_velocity",
    "per_sample",
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
# Time maps (docs/method.md §1.3). Tensors in, tensors out; a Python float becomes a float64 scalar.


def _as_tensor(x: TimeLike, name: str) -> Tensor:
    """A float tensor of ``x``: floating tensors as they are, integer tensors and Python numbers as float64."""
    if isinstance(x, Tensor):
        if x.is_floating_point():
            return x
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name} must be a real tensor or number, got a {x.dtype} tensor")
        return x.to(torch.float64)
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    raise ValueError(f"{name} must be a tensor or a number, got {type(x).__name__}")


def sigma_to_rf(sigma: TimeLike) -> Tensor:
    """ρ = σ/(1 + σ)."""
    sigma = _as_tensor(sigma, "sigma")
    return sigma / (1 + sigma)


def rf_to_sigma(rho: TimeLike) -> Tensor:
    """σ = ρ/(1 − ρ), with ρ clamped to [0, 1 − ε_dtype] so that ρ = 1 stays finite (t < π/2)."""
    rho = _as_tensor(rho, "rho")
    rho = rho.clamp(0.0, 1.0 - torch.finfo(rho.dtype).eps)
    return rho / (1 - rho)


def sigma_to_trig(sigma: TimeLike) -> Tensor:
    """t = arctan σ (σ = inf gives π/2)."""
    return torch.atan(_as_tensor(sigma, "sigma"))


def trig_to_sigma(t: TimeLike) -> Tensor:
    """σ = tan t."""
    return torch.tan(_as_tensor(t, "t"))


def rf_to_trig(rho: TimeLike) -> Tensor:
    """t = arctan(ρ/(1 − ρ)), through the clamped ``rf_to_sigma``."""
    return torch.atan(rf_to_sigma(rho))


def trig_to_rf(t: TimeLike) -> Tensor:
    """ρ = sin t/(sin t + cos t) (= tan t/(1 + tan t), finite at t = π/2)."""
    t = _as_tensor(t, "t")
    s = torch.sin(t)
    return s / (s + torch.cos(t))


def shift_rf_time(rho: TimeLike, shift: float) -> Tensor:
    """Wan's time shift ρ' = Sρ/(1 + (S − 1)ρ); identity for S ≤ 0. Its inverse is a shift by 1/S."""
    rho = _as_tensor(rho, "rho")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift):
        raise ValueError(f"shift must be a finite number, got {shift!r}")
    if shift <= 0:
        return rho
    return shift * rho / (1 + (shift - 1) * rho)


# ------------------------------------------------------------------------------------------------
# Denoiser (docs/method.md §1.4)


class TrigFlowScalings(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def trigflow_scalings(t: TimeLike) -> TrigFlowScalings:
    """EDM-style preconditioning of a Wan RF network in TrigFlow time, in float64 (shape of ``t``)."""
    t = _as_tensor(t, "t").to(torch.float64)
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


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else type(x).__name__


def _check_output(v: Any, x: Tensor, name: str) -> None:
    """A network's velocity is a floating tensor of its input's shape on its input's device: a wrong batch
    would otherwise broadcast silently through the losses."""
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != x.shape or v.device != x.device:
        raise ValueError(f"{name} returned {_describe(v)}; expected a floating tensor of its input's shape "
                         f"{tuple(x.shape)} on {x.device}")


def network_velocity(net: Callable, x: Tensor, timestep: Tensor, context: Any, *, name: str = "network",
                     inputs: Mapping[str, Tensor] | None = None) -> Tensor:
    """``v = net(x, timestep, context, **inputs)`` under the precision policy; returns float64.

    ``x`` is cast to the network's dtype (bf16 on GPU). ``timestep`` (c_noise = 1000ρ: [B], or a
    per-frame map [B, 1, T, 1, 1] under frame replacement, §12) goes in at least fp32: the reference
    rounds it to bf16 too, which is ``WanConfig.bf16_timestep``, the network's own flag. The output goes
    to fp32 (the reference's cast), then float64. ``inputs``: the conditioning's keyword tensors
    (``FrameCondition.inputs``), passed as they are; none for an unconditioned call.
    ``name`` (e.g. "student") names the network in the ValueError raised when its output is not a
    floating tensor of ``x``'s shape.
    """
    dtype = network_dtype(net)
    if dtype is not None:
        x = x.to(dtype)
        timestep = timestep.to(torch.promote_types(dtype, torch.float32))
    v = net(x, timestep, context, **(inputs or {}))
    _check_output(v, x, name)
    return v.to(torch.promote_types(v.dtype, torch.float32)).to(torch.float64)


def per_sample(values: Tensor, x: Tensor) -> Tensor:
    """Per-sample values [B] viewed as [B, 1, ..., 1], to broadcast over every other dim of ``x`` [B, ...]."""
    if values.shape != x.shape[:1]:
        raise ValueError(f"per-sample values must have shape [B]=[{x.shape[0]}] to broadcast over "
                         f"{tuple(x.shape)}, got {tuple(values.shape)}")
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def check_time(t: Any, batch_size: int, name: str = "t") -> None:
    """A time is a floating tensor [B]: one per sample. (Its range: ``check_time_range``.)"""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim != 1 or t.shape[0] != batch_size:
        got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor of shape [B]=[{batch_size}] (one time per "
                         f"sample), got {got}")


def check_time_range(t: Tensor, name: str = "t") -> None:
    """TrigFlow times lie in [0, π/2] (π/2 rounded up in ``t``'s dtype: float32(π/2) > π/2); NaN does not.

    A data-dependent check (one host sync): the losses and samplers run it once on entry, not on every
    network call."""
    upper = math.pi / 2 * (1 + torch.finfo(t.dtype).eps)
    if not bool(((t >= 0) & (t <= upper)).all()):
        bad = t[~((t >= 0) & (t <= upper))]
        raise ValueError(f"{name} must lie in [0, π/2] (TrigFlow time), got {bad[:4].tolist()}"
                         f"{' ...' if bad.numel() > 4 else ''}")


def trigflow_denoise(net: Callable, x_t: Tensor, t: Tensor, context: Any, *, name: str = "network",
                     condition: FrameCondition | None = None) -> Denoised:
    """x̂0 and F of network ``net`` at TrigFlow state ``x_t`` [B, ...] and time ``t`` [B] (float64).

    ``condition`` (§12): the network gets its ``inputs``; under frame replacement the given frames of
    ``x_t`` are replaced by the clean latent, their time is 0 (per-frame scalings and timestep map), and
    x̂0 = latent, F = 0 there exactly, so a JVP through this function has a zero tangent on them.
    ``name`` names the network in the error raised when its output does not have ``x_t``'s shape. The
    range of ``t`` is not checked here (a host sync per call): callers check it on entry."""
    if not isinstance(x_t, Tensor) or not x_t.is_floating_point() or x_t.ndim < 2:
        raise ValueError(f"x_t must be a floating tensor [B, ...], got "
                         f"{tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__}")
    check_time(t, x_t.shape[0], "t")
    x_t, t = x_t.to(torch.float64), t.to(torch.float64)
    if condition is not None:
        condition = condition.checked(x_t)
        x_t = condition.impose(x_t)
    t_field = per_sample(t, x_t) if condition is None else condition.frame_time(t, x_t)
    c_skip, c_out, c_in, c_noise = trigflow_scalings(t_field)
    per_frame = condition is not None and condition.mask is not None
    timestep = c_noise.expand(x_t.shape[0], *c_noise.shape[1:]) if per_frame else c_noise.reshape(-1)
    v = network_velocity(net, c_in * x_t, timestep, context, name=name,
                         inputs=None if condition is None else condition.inputs)
    c, s = torch.cos(t_field), torch.sin(t_field)
    x0 = c_skip * x_t + c_out * v
    F = ((c - s) * x_t + v) / (c + s)  # = (c x_t − x̂0)/s without the cancellation at small s
    if per_frame:  # exact on the given frames, whatever the network returned there
        x0 = condition.impose(x0)
        F = condition.exclude(F)
    return Denoised(x0=x0, F=F)


# ------------------------------------------------------------------------------------------------
# Image-to-video conditioning (docs/method.md §12)


class FrameCondition(NamedTuple):
    """Image-to-video conditioning that every network call of a loss or sampler honours (§12).

    Two styles, combinable:

    * frame replacement (Wan2.2 TI2V): ``latent`` [B or 1, C, T, H, W] (read on the given frames only)
      and ``mask`` [B or 1, 1, T, 1, 1] (bool or 0/1, True on the given frames). Every state keeps the
      given frames exactly clean, their time is 0, the network gets a per-frame timestep map
      [B, 1, T, 1, 1] (1000ρ, 0 on the given frames) instead of [B], and the losses exclude them.
    * channel concatenation (Wan2.1 I2V, Wan2.2 I2V-A14B): ``inputs``, keyword tensors passed to the
      network as they are (e.g. ``y`` = mask ++ conditioning-latent channels, ``image_context`` = CLIP
      tokens), batch B or 1; constants in (x_t, t), so no tangent flows into them. The state is all
      generated: every frame is noised and trained, as the teacher was.
    """

    latent: Tensor | None = None
    mask: Tensor | None = None
    inputs: Mapping[str, Tensor] | None = None

    def checked(self, x: Tensor) -> FrameCondition:
        """This condition validated against states ``x`` [B, C, T, H, W]: the mask as bool, batch-1
        inputs expanded to B (views). A 0/1 float mask costs one host sync; a bool one none."""
        batch = x.shape[0]
        latent, mask, inputs = self.latent, self.mask, dict(self.inputs or {})
        if (latent is None) != (mask is None):
            raise ValueError("FrameCondition: latent and mask go together (frame replacement), got "
                             f"{'latent' if mask is None else 'mask'} alone")
        if mask is not None:
            if x.ndim != 5:
                raise ValueError(f"FrameCondition with a frame mask needs states [B, C, T, H, W], got {tuple(x.shape)}")
            if not isinstance(mask, Tensor) or mask.ndim != 5 or mask.shape[0] not in (1, batch) \
                    or tuple(mask.shape[1:]) != (1, x.shape[2], 1, 1) or mask.device != x.device:
                raise ValueError(f"FrameCondition.mask must be [B or 1, 1, T, 1, 1] = [{batch} or 1, 1, {x.shape[2]}, "
                                 f"1, 1] on {x.device}, got {_describe(mask)}")
            if mask.dtype != torch.bool:
                if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("FrameCondition.mask must be bool or hold only 0 and 1")
                mask = mask != 0
            if not isinstance(latent, Tensor) or not latent.is_floating_point() or latent.ndim != 5 \
                    or latent.shape[0] not in (1, batch) or latent.shape[1:] != x.shape[1:] or latent.device != x.device:
                raise ValueError(f"FrameCondition.latent must be a floating tensor [B or 1, C, T, H, W] = "
                                 f"[{batch} or 1, {', '.join(map(str, x.shape[1:]))}] on {x.device}, got {_describe(latent)}")
        for key, value in inputs.items():
            if not isinstance(value, Tensor) or value.ndim < 1 or value.shape[0] not in (1, batch) \
                    or value.device != x.device:
                raise ValueError(f"FrameCondition.inputs[{key!r}] must be a tensor with batch {batch} or 1 on "
                                 f"{x.device}, got {_describe(value)}")
            inputs[key] = value.expand(batch, *value.shape[1:])
        return FrameCondition(latent, mask, inputs or None)

    def impose(self, x: Tensor) -> Tensor:
        """``x`` with the given frames replaced by the clean latent (in ``x``'s dtype); ``x`` itself
        without a frame mask."""
        if self.mask is None:
            return x
        return torch.where(self.mask, self.latent.to(x.dtype), x)

    def exclude(self, x: Tensor) -> Tensor:
        """``x`` with the given frames set to 0: they carry no velocity, tangent or loss."""
        return x if self.mask is None else torch.where(self.mask, 0.0, x)

    def frame_time(self, t: Tensor, x: Tensor) -> Tensor:
        """The time of each position: t [B] as [B, 1, ..., 1], or [B, 1, T, 1, 1] with 0 on given frames."""
        t = per_sample(t, x)
        return t if self.mask is None else torch.where(self.mask, 0.0, t)

    def generated_count(self, x: Tensor) -> Tensor:
        """Number of generated (not given) positions of each sample of ``x``, [B] float64."""
        if self.mask is None:
            return torch.full((x.shape[0],), float(x[0].numel()), dtype=torch.float64, device=x.device)
        free_frames = (~self.mask).flatten(1).sum(1).to(torch.float64)
        return (free_frames * (x[0].numel() // x.shape[2])).expand(x.shape[0])


# ------------------------------------------------------------------------------------------------
# Networks: functional calls and classifier-free guidance


class FunctionalNet(NamedTuple):
    """``module`` evaluated on explicit ``params`` (and ``buffers``) through ``torch.func.functional_call``,
    so losses are pure functions of parameter dicts. Missing names fall back to the module's own."""

    module: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor] | None = None

    def __call__(self, x: Tensor, timestep: Tensor, context: Any, **inputs: Tensor) -> Tensor:
        return functional_call(self.module, (dict(self.params), dict(self.buffers or {})),
                               (x, timestep, context), inputs)

    @property
    def dtype(self) -> torch.dtype | None:
        for p in self.params.values():
            if p.is_floating_point():
                return p.dtype
        return network_dtype(self.module)


class GuidedNet(NamedTuple):
    """Classifier-free guidance on the velocity: v = v_u + w (v_c − v_u), combined in float64.

    x̂0 and F are affine in v with the same coefficients, so this is also CFG on x̂0 and on F
    (the reference's form, docs/method.md §2.2, §3.3). Build with ``classifier_free_guidance``."""

    net: Callable
    negative_context: Any
    guidance: float
    name: str = "network"  # for the output-shape errors of either pass

    def __call__(self, x: Tensor, timestep: Tensor, context: Any, **inputs: Tensor) -> Tensor:
        # the image conditioning (inputs) stays in both passes: only the text is negated, as Wan's I2V does
        v_cond = self.net(x, timestep, context, **inputs)
        _check_output(v_cond, x, f"{self.name} (conditional pass)")
        v_uncond = self.net(x, timestep, self.negative_context, **inputs)
        _check_output(v_uncond, x, f"{self.name} (negative pass)")
        return v_uncond.to(torch.float64) + self.guidance * (v_cond.to(torch.float64) - v_uncond.to(torch.float64))

    @property
    def dtype(self) -> torch.dtype | None:
        return network_dtype(self.net)


def classifier_free_guidance(net: Callable, guidance: float, negative_context: Any, *,
                             name: str = "network") -> Callable:
    """``net`` guided with weight ``guidance`` against ``negative_context`` (the negative prompt).

    Guidance applies only for w > 1 (the reference's rule); 0 ≤ w ≤ 1 returns ``net`` unchanged
    (conditional only); w < 0 has no meaning and is an error. A missing negative context with w > 1 is
    an error: the reference silently turns CFG off in that case (docs/method.md §10.11).
    ``name`` names the network in output-shape errors.
    """
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if guidance <= 1:
        return net
    if negative_context is None:
        raise ValueError(f"negative_context is required for classifier-free guidance {guidance} > 1 "
                         f"(pass the negative-prompt embedding, or guidance=1 to disable CFG)")
    return GuidedNet(net, negative_context, float(guidance), name)


class TimeSwitchedNet(NamedTuple):
    """Two networks split at an RF time (Wan2.2 A14B's experts, and the per-expert students, §12.3):
    ``high`` for the samples whose timestep is >= 1000·``boundary``, ``low`` for the others.

    Per sample, by the sample's largest timestep (a per-frame map's generated frames), the rule of
    Wan2.2's sampler. Pure composition: either side is any network (a ``FunctionalNet`` over an expert's
    parameters, a ``GuidedNet``, a function). A batch straddling the boundary is split into the rows of
    each side and put back in order; the context and the conditioning inputs are split with it when they
    are tensors with one row per sample, and so is a ``GuidedNet`` side's negative context (per-expert
    guidance weights, as Wan2.2 A14B uses). The dispatch reads the timesteps' values: eager only (works
    under ``torch.func.jvp``/``grad``; ``torch.compile`` breaks the graph there).
    """

    high: Callable
    low: Callable
    boundary: float

    def uses_high(self, timestep: Tensor) -> Tensor:
        """[B] bool: the samples that go to ``high``."""
        t = timestep if timestep.ndim == 1 else timestep.flatten(1).amax(1)
        return t >= self.boundary * RF_TIMESTEP_SCALE

    def __call__(self, x: Tensor, timestep: Tensor, context: Any, **inputs: Tensor) -> Tensor:
        if not 0.0 < self.boundary < 1.0:
            raise ValueError(f"TimeSwitchedNet: boundary must be an RF time in (0, 1), got {self.boundary!r}")
        if not isinstance(timestep, Tensor) or timestep.ndim < 1 or timestep.shape[0] != x.shape[0]:
            raise ValueError(f"TimeSwitchedNet: timestep must be a tensor with batch {x.shape[0]}, got {_describe(timestep)}")
        high = self.uses_high(timestep)
        if bool(high.all()):
            return self.high(x, timestep, context, **inputs)
        if not bool(high.any()):
            return self.low(x, timestep, context, **inputs)
        rows = (high.nonzero()[:, 0], (~high).nonzero()[:, 0])

        def pick(value: Any, index: Tensor) -> Any:
            per_row = isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == x.shape[0]
            return value.index_select(0, index) if per_row else value

        def rows_of(net: Callable, index: Tensor) -> Callable:
            # a guided side (per-expert guidance weights) has a negative context per sample too
            return net._replace(negative_context=pick(net.negative_context, index)) if isinstance(net, GuidedNet) else net

        out = torch.cat([rows_of(net, r)(x.index_select(0, r), timestep.index_select(0, r), pick(context, r),
                                         **{k: pick(v, r) for k, v in inputs.items()})
                         for net, r in zip((self.high, self.low), rows)])
        return out.index_select(0, torch.argsort(torch.cat(rows)))  # back in batch order

    @property
    def dtype(self) -> torch.dtype | None:
        return network_dtype(self.high)
