"""DMD2-style reverse-divergence regularizer: student rollout, DMD loss, fake-score critic (docs/method.md §3).

    rollout  t_0 = π/2, x = ε;  x̂0 = f_θ(x, t_i);  x ← c_{i+1} x̂0 + s_{i+1} z  …  G = x̂0 at the last step
    DMD      t ~ p_D, x^D = c G + s ε;  ω = max(mean|G − x̂0_real|, 1e-5);  Δ = (x̂0_fake − x̂0_real)/ω
             L = λ Σ (G − sg(G − Δ))²,  so ∂L/∂G = 2λΔ pushes G from the fake score towards the teacher
    critic   L = Σ (G − x̂0_fake(x^D, t))² / sin² t = ‖F_fake − F*‖²,   G detached

Image-to-video (§12): a ``FrameCondition`` reaches every network call; under frame replacement every
state (rollout start, re-noised states, x^D) keeps the given frames clean, G equals the latent there
exactly, and the losses (and ω, a mean over the generated positions) exclude them.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from rcm.losses.common import (
    check_callable,
    check_config,
    check_context,
    check_count,
    check_sample,
    draw_normal,
    draw_time_and_noise,
    per_sample_sum,
)
from rcm.losses.config import DMDConfig
from rcm.models.trigflow import (
    FrameCondition,
    check_time_range,
    classifier_free_guidance,
    per_sample,
    trigflow_denoise,
)
from rcm.timing import phase

__all__ = ["backward_simulation", "dmd_loss", "fake_score_loss", "rollout_times"]


def rollout_times(batch_size: int, num_steps: int, *, config: DMDConfig = DMDConfig(),
                  generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """TrigFlow times [num_steps + 1, B] (float64) of a student rollout: π/2, mid-times, 0 (§3.2).

    Mid-times are fresh draws t'_i ~ p_D made non-increasing, t_i = min(t'_i, t_{i−1}), or the fixed
    ``config.backward_timesteps`` with ``config.fix_timesteps``."""
    batch_size = check_count(batch_size, "batch_size", 1)
    num_steps = check_count(num_steps, "num_steps", 1)
    check_config(config, DMDConfig)
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
                        with_grad: bool = False, times: Tensor | None = None,
                        condition: FrameCondition | None = None) -> Tensor:
    """Student rollout from pure noise (§3.2), returns G [B, ...] in fp32.

    noise: the start x = ε at t = π/2. times [num_steps + 1, B]: from ``rollout_times`` (drawn from
    ``generator`` when not given); the re-noising draws come from ``generator`` too.
    Gradients flow only through the last student call, and only when ``with_grad``: the trajectory
    itself is a stop-gradient. ``condition`` (§12): every state keeps the given frames clean and G
    equals the latent there exactly (and carries no gradient there). Each step calls ``student`` at its
    own time, so a ``TimeSwitchedNet`` student crosses from one expert to the other along the rollout.
    """
    check_callable(student, "student")
    batch = check_sample(noise, "noise")
    num_steps = check_count(num_steps, "num_steps", 1)
    check_config(config, DMDConfig)
    check_context(context, noise, "context", "noise")
    if condition is not None:
        condition = condition.checked(noise)
    drawn = times is None
    if drawn:
        times = rollout_times(batch, num_steps, config=config, generator=generator, device=noise.device)
    if not isinstance(times, Tensor) or not times.is_floating_point() or times.shape != (num_steps + 1, batch) \
            or times.device != noise.device:
        got = f"{tuple(times.shape)} {times.dtype} on {times.device}" if isinstance(times, Tensor) \
            else type(times).__name__
        raise ValueError(f"times must be a floating tensor [num_steps + 1, B] = [{num_steps + 1}, {batch}] on "
                         f"{noise.device}, got {got}")
    if not drawn:  # (drawn times are valid by construction: no host syncs for them)
        check_time_range(times, "times")
        if bool((times[1:] > times[:-1]).any()):
            raise ValueError("times must be non-increasing along the rollout (dim 0): a step only removes noise")
    x = noise if condition is None else condition.impose(noise)
    for i in range(num_steps):
        last = i == num_steps - 1
        # a sample gone non-finite is fed as 0 (so the grad call's activations stay finite) and comes
        # out as NaN, for the DMD guard to zero
        finite = torch.isfinite(x).flatten(1).all(1)
        x = torch.where(per_sample(finite, x), x, 0.0)
        with torch.set_grad_enabled(with_grad and last):
            x0 = trigflow_denoise(student, x, times[i], context, name="student", condition=condition).x0
            x0 = x0.to(torch.float32)
            x0 = torch.where(per_sample(finite, x0), x0, math.nan)
        if not last:
            z = draw_normal(noise.shape, generator, noise.device, name="rollout noise")
            t_next = times[i + 1]
            x = per_sample(torch.cos(t_next), x0) * x0 + per_sample(torch.sin(t_next), x0) * z
            x = x if condition is None else condition.impose(x)
    return x0  # on given frames: the latent (rounded to fp32), imposed by the denoiser, with no gradient


def dmd_loss(G: Tensor, teacher: Callable, fake_score: Callable, context: Any, negative_context: Any = None,
             *, config: DMDConfig = DMDConfig(), generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None,
             condition: FrameCondition | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample DMD loss [B] (float64) on student samples ``G`` (with grad), and diagnostics (§3.3).

    teacher: the real score, CFG-guided with ``config.guidance`` against ``negative_context``;
    fake_score: the critic, conditional only. Both run without grad.
    t [B] ~ p_D and noise (shape of G): the draws, from ``generator`` when not given (t first).
    condition (§12): of every score call; under frame replacement x^D keeps the given frames clean, and
    Δ, the loss and ω (the mean over the generated positions) exclude them.
    Diagnostics (detached): ``omega`` [B], ``nonfinite`` (samples zeroed by the guard).
    """
    check_config(config, DMDConfig)
    check_callable(teacher, "teacher")
    check_callable(fake_score, "fake_score")
    t, noise = draw_time_and_noise(G, "G", config.time_dist, generator, t, noise)
    check_context(context, G, "context", "G")
    check_context(negative_context, G, "negative_context", "G")
    condition = FrameCondition() if condition is None else condition.checked(G)
    x_D = condition.impose(per_sample(torch.cos(t), G) * G.to(torch.float64) + per_sample(torch.sin(t), G) * noise)
    with phase("dmd.scores"), torch.no_grad():
        x0_fake = trigflow_denoise(fake_score, x_D, t, context, name="fake_score", condition=condition).x0
        teacher_guided = classifier_free_guidance(teacher, config.guidance, negative_context, name="teacher")
        x0_real = trigflow_denoise(teacher_guided, x_D, t, context, name="teacher", condition=condition).x0
        G_detached = G.detach().to(torch.float64)
        error = (G_detached - x0_real).abs()
        mean_error = error.flatten(1).mean(1) if condition.mask is None else \
            per_sample_sum(condition.exclude(error)) / condition.generated_count(G)  # over generated positions
        omega = mean_error.clamp_min(config.omega_min)
        delta = condition.exclude((x0_fake - x0_real) / per_sample(omega, G))
    residual = G.to(torch.float64) - (G_detached - delta)  # = Δ in value (0 on given frames), gradient 1 into G

    # A sample with any non-finite value gets loss and gradient exactly 0 (mask before squaring).
    finite = torch.isfinite(residual.detach()).flatten(1).all(1)
    residual = torch.where(per_sample(finite, residual), residual, 0.0)
    loss = config.loss_scale * per_sample_sum(residual ** 2)
    return loss, {"omega": omega, "nonfinite": (~finite).sum()}


def fake_score_loss(G: Tensor, fake_score: Callable, context: Any, *, config: DMDConfig = DMDConfig(),
                    generator: torch.Generator | None = None, t: Tensor | None = None,
                    noise: Tensor | None = None, condition: FrameCondition | None = None,
                    ) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample critic loss [B] (float64): the fake score's denoising error on student samples (§3.4).

        Σ (G − x̂0_fake(x^D, t))² / sin² t  =  ‖F_fake − F*‖²,   F* = (cos t · x^D − G)/sin t

    ``G`` is detached; gradients flow into ``fake_score``. The weight 1/sin² t is capped at
    ``config.critic_max_weight`` (None: uncapped, the reference). Conditional only, no loss scale.
    A sample with any non-finite value (in G, ε or the fake score's output) gets loss and gradient
    exactly 0, as in the sCM and DMD losses. ``condition`` (§12): of the fake score's call; under frame
    replacement x^D keeps the given frames clean and the loss excludes them.
    Diagnostics: ``weight`` [B], ``nonfinite`` (samples zeroed by the guard).
    """
    check_config(config, DMDConfig)
    check_callable(fake_score, "fake_score")
    G = G.detach() if isinstance(G, Tensor) else G
    t, noise = draw_time_and_noise(G, "G", config.time_dist, generator, t, noise)
    check_context(context, G, "context", "G")
    condition = FrameCondition() if condition is None else condition.checked(G)
    x_D = condition.impose(per_sample(torch.cos(t), G) * G.to(torch.float64) + per_sample(torch.sin(t), G) * noise)
    # A non-finite sample never reaches the network: its zero loss gradient times NaN activations would
    # still poison every weight gradient (0·NaN in the weight-gradient matmuls).
    finite_input = torch.isfinite(x_D).flatten(1).all(1)
    x_D = torch.where(per_sample(finite_input, x_D), x_D, 0.0)
    with phase("critic.forward"):
        x0_fake = trigflow_denoise(fake_score, x_D, t, context, name="fake_score", condition=condition).x0
    weight = 1 / torch.sin(t) ** 2
    if config.critic_max_weight is not None:
        weight = weight.clamp_max(config.critic_max_weight)
    residual = condition.exclude(G.to(torch.float64) - x0_fake)
    # mask before squaring (torch.where passes a zero gradient to the masked branch), then the loss itself
    # (an uncapped weight at t = 0 is inf, and inf·0 is NaN)
    finite = finite_input & torch.isfinite(residual.detach()).flatten(1).all(1)
    residual = torch.where(per_sample(finite, residual), residual, 0.0)
    loss = torch.where(finite, weight * per_sample_sum(residual ** 2), 0.0)
    return loss, {"weight": weight, "nonfinite": (~finite).sum()}
