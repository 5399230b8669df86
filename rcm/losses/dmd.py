"""DMD2-style reverse-divergence regularizer: student rollout, DMD loss, fake-score critic (RCM_METHOD.md §3).

    rollout  t_0 = π/2, x = ε;  x̂0 = f_θ(x, t_i);  x ← c_{i+1} x̂0 + s_{i+1} z  …  G = x̂0 at the last step
    DMD      t ~ p_D, x^D = c G + s ε;  ω = max(mean|G − x̂0_real|, 1e-5);  Δ = (x̂0_fake − x̂0_real)/ω
             L = λ Σ (G − sg(G − Δ))²,  so ∂L/∂G = 2λΔ pushes G from the fake score towards the teacher
    critic   L = Σ (G − x̂0_fake(x^D, t))² / sin² t = ‖F_fake − F*‖²,   G detached
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from rcm.losses.common import check_sample, draw_normal, draw_time_and_noise, per_sample, per_sample_sum
from rcm.losses.config import DMDConfig
from rcm.models.trigflow import classifier_free_guidance, trigflow_denoise
from rcm.timing import phase

__all__ = ["backward_simulation", "dmd_loss", "fake_score_loss", "rollout_times"]


def rollout_times(batch_size: int, num_steps: int, *, config: DMDConfig = DMDConfig(),
                  generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """TrigFlow times [num_steps + 1, B] (float64) of a student rollout: π/2, mid-times, 0 (§3.2).

    Mid-times are fresh draws t'_i ~ p_D made non-increasing, t_i = min(t'_i, t_{i−1}), or the fixed
    ``config.backward_timesteps`` with ``config.fix_timesteps``."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    times = [torch.full((batch_size,), math.pi / 2, dtype=torch.float64, device=device)]
    for i in range(1, num_steps):
        if config.fix_timesteps:
            if i > len(config.backward_timesteps):
                raise ValueError(f"num_steps={num_steps} needs {num_steps - 1} backward_timesteps with "
                                 f"fix_timesteps, config has {config.backward_timesteps}")
            t_i = torch.full_like(times[0], config.backward_timesteps[i - 1])
        else:
            t_i = torch.minimum(config.time_dist.sample(batch_size, generator, device), times[-1])
        times.append(t_i)
    times.append(torch.zeros_like(times[0]))
    return torch.stack(times)


def backward_simulation(student: Callable, context: Any, noise: Tensor, num_steps: int, *,
                        config: DMDConfig = DMDConfig(), generator: torch.Generator | None = None,
                        with_grad: bool = False, times: Tensor | None = None) -> Tensor:
    """Student rollout from pure noise (§3.2), returns G [B, ...] in fp32.

    noise: the start x = ε at t = π/2. times [num_steps + 1, B]: from ``rollout_times`` (drawn from
    ``generator`` when not given); the re-noising draws come from ``generator`` too.
    Gradients flow only through the last student call, and only when ``with_grad``: the trajectory
    itself is a stop-gradient.
    """
    batch = check_sample(noise, "noise")
    if times is None:
        times = rollout_times(batch, num_steps, config=config, generator=generator, device=noise.device)
    if not isinstance(times, Tensor) or times.shape != (num_steps + 1, batch):
        raise ValueError(f"times must be a tensor [num_steps + 1, B] = [{num_steps + 1}, {batch}], got "
                         f"{tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__}")
    x = noise
    for i in range(num_steps):
        last = i == num_steps - 1
        # a sample gone non-finite is fed as 0 (so the grad call's activations stay finite) and comes
        # out as NaN, for the DMD guard to zero
        finite = torch.isfinite(x).flatten(1).all(1)
        x = torch.where(per_sample(finite, x), x, 0.0)
        with torch.set_grad_enabled(with_grad and last):
            x0 = trigflow_denoise(student, x, times[i], context).x0.to(torch.float32)
            x0 = torch.where(per_sample(finite, x0), x0, math.nan)
        if not last:
            z = draw_normal(noise.shape, generator, noise.device, name="rollout noise")
            t_next = times[i + 1]
            x = per_sample(torch.cos(t_next), x0) * x0 + per_sample(torch.sin(t_next), x0) * z
    return x0


def dmd_loss(G: Tensor, teacher: Callable, fake_score: Callable, context: Any, negative_context: Any = None,
             *, config: DMDConfig = DMDConfig(), generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample DMD loss [B] (float64) on student samples ``G`` (with grad), and diagnostics (§3.3).

    teacher: the real score, CFG-guided with ``config.guidance`` against ``negative_context``;
    fake_score: the critic, conditional only. Both run without grad.
    t [B] ~ p_D and noise (shape of G): the draws, from ``generator`` when not given (t first).
    Diagnostics (detached): ``omega`` [B], ``nonfinite`` (samples zeroed by the guard).
    """
    t, noise = draw_time_and_noise(G, "G", config.time_dist, generator, t, noise)
    x_D = per_sample(torch.cos(t), G) * G.to(torch.float64) + per_sample(torch.sin(t), G) * noise
    with phase("dmd.scores"), torch.no_grad():
        x0_fake = trigflow_denoise(fake_score, x_D, t, context).x0
        teacher_guided = classifier_free_guidance(teacher, config.guidance, negative_context)
        x0_real = trigflow_denoise(teacher_guided, x_D, t, context).x0
        G_detached = G.detach().to(torch.float64)
        omega = (G_detached - x0_real).abs().flatten(1).mean(1).clamp_min(config.omega_min)
        delta = (x0_fake - x0_real) / per_sample(omega, G)
    residual = G.to(torch.float64) - (G_detached - delta)  # = Δ in value, gradient 1 into G

    # A sample with any non-finite value gets loss and gradient exactly 0 (mask before squaring).
    finite = torch.isfinite(residual.detach()).flatten(1).all(1)
    residual = torch.where(per_sample(finite, residual), residual, 0.0)
    loss = config.loss_scale * per_sample_sum(residual ** 2)
    return loss, {"omega": omega, "nonfinite": (~finite).sum()}


def fake_score_loss(G: Tensor, fake_score: Callable, context: Any, *, config: DMDConfig = DMDConfig(),
                    generator: torch.Generator | None = None, t: Tensor | None = None,
                    noise: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample critic loss [B] (float64): the fake score's denoising error on student samples (§3.4).

        Σ (G − x̂0_fake(x^D, t))² / sin² t  =  ‖F_fake − F*‖²,   F* = (cos t · x^D − G)/sin t

    ``G`` is detached; gradients flow into ``fake_score``. The weight 1/sin² t is capped at
    ``config.critic_max_weight`` (None: uncapped, the reference). Conditional only, no loss scale.
    Diagnostics: ``weight`` [B].
    """
    G = G.detach()
    t, noise = draw_time_and_noise(G, "G", config.time_dist, generator, t, noise)
    x_D = per_sample(torch.cos(t), G) * G.to(torch.float64) + per_sample(torch.sin(t), G) * noise
    with phase("critic.forward"):
        x0_fake = trigflow_denoise(fake_score, x_D, t, context).x0
    weight = 1 / torch.sin(t) ** 2
    if config.critic_max_weight is not None:
        weight = weight.clamp_max(config.critic_max_weight)
    loss = weight * per_sample_sum((G.to(torch.float64) - x0_fake) ** 2)
    return loss, {"weight": weight}
