"""sCM loss: continuous-time consistency distillation through an exact JVP (docs/method.md §2).

    t ~ p_G,  ε ~ N(0, I),  x_t = c x0 + s ε                                           (float64)
    F_tea = F_u + w (F_c − F_u)                                    teacher PF-ODE velocity, no grad
    cs·dF/dt = jvp(F_θ⁻, (x_t, t), (c s F_tea, c s))               whole student denoiser, no grad
    g  = −c √(1 − r² s²) (F_θ⁻ − F_tea) − r c s x_t − cs·dF/dt     r: tangent warmup
    ĝ  = g / (‖g‖ + 0.1)                                            per-sample norm, float64
    L  = λ Σ_{C,T,H,W} (F_θ − F_θ⁻ − ĝ)²                             F_θ from a separate grad forward

At r = 1, g = c · df_θ⁻/dt with f = c x_t − s F the consistency function: a descent step moves F_θ
along ĝ, which lowers the change of f along the teacher's ODE (∂f/∂F = −s).

Image-to-video (§12): a ``FrameCondition`` reaches every network call; under frame replacement x_t keeps
the given frames clean, F_tea, F_θ, the tangent and g are exactly 0 there, so they add nothing to ‖g‖
or the loss.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
from torch import Tensor

from rcm.losses.common import (
    check_callable,
    check_config,
    check_context,
    check_count,
    check_like,
    check_sample,
    draw_time_and_noise,
    per_sample_sum,
)
from rcm.losses.config import SCMConfig
from rcm.models.trigflow import (
    FrameCondition,
    check_time,
    classifier_free_guidance,
    per_sample,
    trigflow_denoise,
)
from rcm.timing import phase

__all__ = ["normalize_tangent", "scm_jvp", "scm_loss", "scm_target", "tangent_warmup_ratio"]


def tangent_warmup_ratio(iteration: int, tangent_warmup: int) -> float:
    """r = min(1, iteration/tangent_warmup), or 1 without warmup (§2.4)."""
    iteration = check_count(iteration, "iteration")
    tangent_warmup = check_count(tangent_warmup, "tangent_warmup")
    return 1.0 if tangent_warmup == 0 else min(1.0, iteration / tangent_warmup)


def normalize_tangent(g: Tensor, eps: float = 0.1) -> Tensor:
    """ĝ = g/(‖g‖₂ + eps), the L2 norm per sample over all of C, T, H, W, in float64 (§2.6)."""
    check_sample(g, "g")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    g = g.to(torch.float64)
    return g / per_sample(g.flatten(1).norm(dim=1) + eps, g)


def scm_jvp(student: Callable, x_t: Tensor, t: Tensor, context: Any, F_teacher: Tensor, *,
            condition: FrameCondition | None = None) -> Tensor:
    """c s dF_θ⁻/dt = c s (∂_x F_θ⁻ · F_tea + ∂_t F_θ⁻) at (x_t, t), float64, no grad (§2.3).

    One ``torch.func.jvp`` of the whole student denoiser (wrapper + network) w.r.t. (x_t, t) with the
    tangents pre-multiplied by c s (sCM's "JVP rearrangement"): (c s F_tea, c s). The primal is dropped.
    ``condition`` (§12) is a constant of the function: no tangent enters its inputs, and the denoiser
    replaces the given frames by the latent (their state tangent is dropped), so the result is 0 there.
    """
    check_callable(student, "student")
    check_time(t, check_sample(x_t, "x_t"), "t")
    check_like(F_teacher, x_t, "F_teacher", "x_t")
    x_t, t = x_t.to(torch.float64), t.to(torch.float64)
    cs = torch.cos(t) * torch.sin(t)

    def student_F(x: Tensor, time: Tensor) -> Tensor:
        return trigflow_denoise(student, x, time, context, name="student", condition=condition).F

    with torch.no_grad():
        _, cs_dF_dt = torch.func.jvp(student_F, (x_t, t), (per_sample(cs, x_t) * F_teacher, cs))
    return cs_dF_dt


def scm_target(x_t: Tensor, t: Tensor, F_teacher: Tensor, F_minus: Tensor, cs_dF_dt: Tensor, *,
               warmup_ratio: float = 1.0, condition: FrameCondition | None = None) -> Tensor:
    """The sCM target g (float64), §2.4:

        g = −c √(1 − r² s²) (F_θ⁻ − F_tea) − r c s x_t − c s dF_θ⁻/dt

    At r = 1 it is c · df_θ⁻/dt along the teacher's PF-ODE, f = c x_t − s F the consistency function.
    The warmup form (r only on the x_t term, first coefficient c √(1 − r² s²), the JVP term never
    scaled) is the reference's, not the sCM paper's. The given frames of a ``condition`` are at time 0,
    where every term vanishes: g is exactly 0 there (§12).
    """
    check_time(t, check_sample(x_t, "x_t"), "t")
    for name, value in (("F_teacher", F_teacher), ("F_minus", F_minus), ("cs_dF_dt", cs_dF_dt)):
        check_like(value, x_t, name, "x_t")
    r = warmup_ratio
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r <= 1:
        raise ValueError(f"warmup_ratio must be a number in [0, 1], got {r!r}")
    t = t.to(torch.float64)
    c, s = per_sample(torch.cos(t), x_t), per_sample(torch.sin(t), x_t)
    g = -c * torch.sqrt(1 - (r * s) ** 2) * (F_minus - F_teacher) - r * c * s * x_t - cs_dF_dt
    return g if condition is None else condition.checked(x_t).exclude(g)


def scm_loss(student: Callable, teacher: Callable, x0: Tensor, context: Any, negative_context: Any = None,
             *, iteration: int, config: SCMConfig = SCMConfig(), generator: torch.Generator | None = None,
             t: Tensor | None = None, noise: Tensor | None = None, jvp: Callable | None = None,
             condition: FrameCondition | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample sCM loss [B] (float64) and diagnostics.

    student, teacher: networks ``net(x, timestep, context) -> v``, typically ``FunctionalNet``s, so the
        loss is a pure function of their parameter dicts. Gradients flow into the student only.
    x0: clean data [B, C, T, H, W]. context / negative_context: conditioning of the teacher and
        student / the teacher's CFG negative (required when ``config.guidance > 1``).
    iteration: raw trainer iteration, for the tangent warmup.
    t [B], noise (shape of x0): the draws; taken from ``generator`` when not given (t first, then ε).
    jvp: ``(x_t, t, context, F_teacher) -> c s dF_θ⁻/dt``, the JVP pass; default ``scm_jvp`` over
        ``student`` (pass e.g. a ``torch.compile``d ``scm_jvp`` bound to the plain student module).
        With a ``condition`` it is called with the keyword ``condition=`` too (as ``scm_jvp`` takes it).
    condition: image-to-video conditioning of every network call (§12); None for text-to-video.
        Under frame replacement x_t keeps the given frames clean and they add nothing to the loss.

    Diagnostics (detached): ``g_norm`` [B] (‖g‖ before normalization), ``nonfinite`` (number of
    samples zeroed by the guard), ``warmup_ratio`` r.
    """
    check_config(config, SCMConfig)
    check_callable(student, "student")
    check_callable(teacher, "teacher")
    if jvp is not None:
        check_callable(jvp, "jvp")
    r = tangent_warmup_ratio(iteration, config.tangent_warmup)
    t, noise = draw_time_and_noise(x0, "x0", config.time_dist, generator, t, noise)
    check_context(context, x0, "context", "x0")
    check_context(negative_context, x0, "negative_context", "x0")
    if condition is not None:
        condition = condition.checked(x0)
    x_t = per_sample(torch.cos(t), x0) * x0.to(torch.float64) + per_sample(torch.sin(t), x0) * noise.to(torch.float64)
    if condition is not None:
        x_t = condition.impose(x_t)
    # A non-finite input sample never reaches a network: its zero loss gradient times NaN activations
    # would still poison every weight gradient (0·NaN in the weight-gradient matmuls). It is zeroed
    # below like any other non-finite sample.
    finite_input = torch.isfinite(x_t).flatten(1).all(1)
    x_t = torch.where(per_sample(finite_input, x_t), x_t, 0.0)

    with phase("scm.teacher"), torch.no_grad():
        teacher_guided = classifier_free_guidance(teacher, config.guidance, negative_context, name="teacher")
        F_teacher = trigflow_denoise(teacher_guided, x_t, t, context, name="teacher", condition=condition).F
    with phase("scm.jvp"):
        jvp = jvp if jvp is not None else (lambda *args, **kwargs: scm_jvp(student, *args, **kwargs))
        # before the grad forward: lower peak memory
        cs_dF_dt = jvp(x_t, t, context, F_teacher) if condition is None else \
            jvp(x_t, t, context, F_teacher, condition=condition)
        check_like(cs_dF_dt, x_t, "the output of jvp (c s dF/dt)", "x_t")
    with phase("scm.student_forward"):  # separate forward, with grad
        F_theta = trigflow_denoise(student, x_t, t, context, name="student", condition=condition).F
    F_minus = F_theta.detach()
    g = scm_target(x_t, t, F_teacher, F_minus, cs_dF_dt, warmup_ratio=r, condition=condition)

    # A non-finite g or F_θ zeroes that sample's g, F_θ and F_θ⁻: its loss and gradient are exactly 0.
    # (torch.where passes a zero gradient to the masked branch; masking the loss instead would not.)
    finite = finite_input & torch.isfinite(g).flatten(1).all(1) & torch.isfinite(F_minus).flatten(1).all(1)
    keep = per_sample(finite, g)
    g = torch.where(keep, g, 0.0)
    F_theta = torch.where(keep, F_theta, 0.0)
    F_minus = torch.where(keep, F_minus, 0.0)

    g_norm = g.flatten(1).norm(dim=1)
    g_hat = normalize_tangent(g, config.tangent_norm_eps)
    loss = config.loss_scale * per_sample_sum((F_theta - F_minus - g_hat) ** 2)
    return loss, {"g_norm": g_norm, "nonfinite": (~finite).sum(), "warmup_ratio": r}
