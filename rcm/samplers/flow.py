"""Teacher samplers on Wan's rectified flow (docs/method.md §5.3): Euler and UniPC.

Both integrate dx/dρ = v(x, ρ) from ``rf_times[0]`` down to 0 (``shifted_flow_times``), starting at
x = z (unscaled, float64) as the reference does. The velocity callable gets x (float64) and ρ [B];
``teacher_velocity`` builds it from a network, with classifier-free guidance v = v_u + w (v_c − v_u).
With a ``FrameCondition`` (docs/method.md §12) the given frames are at ρ = 0 with v = 0 there, and
the start, every step and the output keep them exactly clean.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from rcm.models.trigflow import (
    RF_TIMESTEP_SCALE,
    FrameCondition,
    classifier_free_guidance,
    network_velocity,
)
from rcm.samplers.schedules import check_num_steps

__all__ = ["TeacherVelocity", "sample_euler", "sample_unipc", "teacher_velocity"]

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_ρ [B, ...], ρ [B]) -> v


class TeacherVelocity(NamedTuple):
    """v(x, ρ) of a (guided) network under ``condition``: the given frames of x are replaced by the clean
    latent, their timestep is 0 and their velocity 0; the samplers impose the same condition on states."""

    net: Callable
    context: Any
    condition: FrameCondition | None = None

    def __call__(self, x: Tensor, rho: Tensor) -> Tensor:
        if self.condition is None:
            return network_velocity(self.net, x, RF_TIMESTEP_SCALE * rho, self.context, name="teacher")
        condition = self.condition.checked(x)
        rho_field = condition.frame_time(rho, x)
        timestep = rho_field.reshape(-1) if condition.mask is None else rho_field.expand(x.shape[0], *rho_field.shape[1:])
        v = network_velocity(self.net, condition.impose(x), RF_TIMESTEP_SCALE * timestep, self.context,
                             name="teacher", inputs=condition.inputs)
        return condition.exclude(v)


def teacher_velocity(net: Callable, context: Any, *, guidance: float = 1.0, negative_context: Any = None,
                     condition: FrameCondition | None = None) -> TeacherVelocity:
    """v(x, ρ) of a network ``net(x, 1000ρ, context)``, guided with weight ``guidance`` (> 1) against
    ``negative_context`` (the image conditioning ``condition`` stays in both passes); float64 out.
    Wan's default is guidance 5 with the negative prompt."""
    if not callable(net):
        raise ValueError(f"net must be callable (net(x, timestep, context) -> v), got {type(net).__name__}")
    guided = classifier_free_guidance(net, guidance, negative_context, name="teacher")
    return TeacherVelocity(guided, context, condition)


def _state_condition(velocity: Velocity, condition: FrameCondition | None, noise: Tensor) -> FrameCondition:
    """The condition imposed on the sampler's states: the given one, else the velocity's own."""
    if condition is None:
        condition = getattr(velocity, "condition", None)
    return FrameCondition() if condition is None else condition.checked(noise)


def _check(velocity: Velocity, noise: Tensor, rf_times: Tensor, progress: Callable | None) -> None:
    if not callable(velocity):
        raise ValueError(f"velocity must be callable (x, rho) -> v, got {type(velocity).__name__}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 2:
        raise ValueError(f"noise must be a floating tensor [B, ...], got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    if not isinstance(rf_times, Tensor) or not rf_times.is_floating_point() or rf_times.ndim != 1 \
            or rf_times.numel() < 2:
        raise ValueError(f"rf_times must be a floating 1-D tensor of at least 2 times, got "
                         f"{tuple(rf_times.shape) if isinstance(rf_times, Tensor) else type(rf_times).__name__}")
    if not bool(torch.isfinite(rf_times).all()) or rf_times[-1] != 0 or (rf_times[1:] >= rf_times[:-1]).any() \
            or rf_times[0] > 1:
        raise ValueError(f"rf_times must decrease from at most 1 to exactly 0, got {rf_times.tolist()}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable(step, num_steps), got {type(progress).__name__}")


def _velocity_at(velocity: Velocity, x: Tensor, rho: float) -> Tensor:
    """v(x, ρ) in float64, checked to have x's shape (a wrong batch would broadcast silently)."""
    v = velocity(x, x.new_full((x.shape[0],), rho))
    if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != x.shape:
        raise ValueError(f"velocity returned {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}; "
                         f"expected a floating tensor of the shape of noise {tuple(x.shape)}")
    return v.to(torch.float64)


@torch.no_grad()
def sample_euler(velocity: Velocity, noise: Tensor, rf_times: Tensor, *,
                 condition: FrameCondition | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Flow Euler: x ← x + (ρ_{i+1} − ρ_i) v(x, ρ_i). Returns float64 samples.
    ``condition``: imposed on every state (default: the velocity's own, for a ``TeacherVelocity``)."""
    _check(velocity, noise, rf_times, progress)
    condition = _state_condition(velocity, condition, noise)
    rho = rf_times.tolist()
    x = condition.impose(noise.to(torch.float64))
    for i in range(len(rho) - 1):
        v = _velocity_at(velocity, x, rho[i])
        x = condition.impose(x + (rho[i + 1] - rho[i]) * v)
        if progress is not None:
            progress(i + 1, len(rho) - 1)
    return x


def _unipc_bh2_coefficients(h: float, rks: list[float]) -> tuple[float, float, Tensor, Tensor]:
    """UniPC's B(h) = expm1(−h) ("bh2") and the order-p system R·ρ = b, x0-prediction (hh = −h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    B_h = math.expm1(hh)  # bh2
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[r ** (i - 1) for r in rks] for i in range(1, len(rks) + 1)], dtype=torch.float64)
    return h_phi_1, B_h, R, torch.tensor(b, dtype=torch.float64)


@torch.no_grad()
def sample_unipc(velocity: Velocity, noise: Tensor, rf_times: Tensor, *, order: int = 2,
                 condition: FrameCondition | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Tensor:
    """Flow UniPC (Zhao et al. 2023) as diffusers/Wan run it: multistep predictor UniP + corrector UniC,
    ``bh2``, x0-prediction x̂0 = x − ρ v, order ``order`` (2: the reference), lower order on the first
    steps and on the final one (lower_order_final). Returns float64 samples.

    With α = 1 − ρ, σ = ρ, λ = log α − log σ and h = λ_t − λ_s, step s → t from x̂0 history m:
        x_t = (σ_t/σ_s) x_s − α_t expm1(−h) m_0 − α_t B(h) Σ_k a_k D_k,   D_k = (m_k − m_0)/r_k,
    r_k = (λ_k − λ_s)/h, and a_k from UniPC's order conditions (a = 1/2 at order 2).
    The corrector re-does the step that produced x_s once x̂0(x_s) is known (no extra evaluation).
    ``condition``: imposed on every state (default: the velocity's own, for a ``TeacherVelocity``).
    """
    _check(velocity, noise, rf_times, progress)
    condition = _state_condition(velocity, condition, noise)
    order = check_num_steps(order, "order")
    sigma = rf_times.tolist()
    if sigma[0] >= 1:
        raise ValueError("rf_times[0] must be < 1 for UniPC (λ = log((1 − ρ)/ρ) is −inf at ρ = 1)")
    num_steps = len(sigma) - 1
    lam = [math.log(1 - s) - math.log(s) if s > 0 else math.inf for s in sigma]

    def update(x: Tensor, s: int, t: int, history: list[tuple[int, Tensor]], m_t: Tensor | None) -> Tensor:
        """Step from index s to t. history: (index, x̂0) with m_0 at s last; m_t: corrector's x̂0 at t."""
        m0 = history[-1][1]
        if sigma[t] == 0:  # h → ∞: the first-order update is x̂0 itself
            return m0
        h = lam[t] - lam[s]
        rks, D1s = [], []
        for j, m_j in reversed(history[:-1]):
            rks.append((lam[j] - lam[s]) / h)
            D1s.append((m_j - m0) / rks[-1])
        rks.append(1.0)
        h_phi_1, B_h, R, b = _unipc_bh2_coefficients(h, rks)
        alpha_t = 1 - sigma[t]
        x_t = sigma[t] / sigma[s] * x - alpha_t * h_phi_1 * m0
        if m_t is None:  # predictor UniP, order p = len(rks)
            if D1s:
                rhos = [0.5] if len(rks) == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
                x_t = x_t - alpha_t * B_h * sum(r * D for r, D in zip(rhos, D1s))
            return x_t
        rhos = [0.5] if len(rks) == 1 else torch.linalg.solve(R, b).tolist()  # corrector UniC
        correction = sum(r * D for r, D in zip(rhos[:-1], D1s)) + rhos[-1] * (m_t - m0)
        return x_t - alpha_t * B_h * correction

    x = condition.impose(noise.to(torch.float64))
    history: list[tuple[int, Tensor]] = []
    x_prev, prev_order = None, 0
    for i in range(num_steps):
        v = _velocity_at(velocity, x, sigma[i])
        m_i = x - sigma[i] * v
        if i > 0:  # UniC: redo the last step with the new x̂0, same order as its predictor
            x = condition.impose(update(x_prev, i - 1, i, history[-prev_order:], m_i))
        history = (history + [(i, m_i)])[-order:]
        this_order = min(order, num_steps - i, i + 1)  # lower_order_final and warm-up
        x_prev, prev_order = x, this_order
        x = condition.impose(update(x, i, i + 1, history[-this_order:], None))
        if progress is not None:
            progress(i + 1, num_steps)
    return x
