"""rCM objectives and their phase schedule (docs/method.md §3.1).

Iteration k is a student iteration during the tangent warmup W and then every ``freq``-th one;
the others train the critic (fake score). Rollout lengths cycle through 1..max_simulation_steps on
counters of each phase:

    k_S = k                     (k < W)        k_D = k − k_S − 1
        = W + ⌊(k − W)/freq⌋    (k ≥ W)        rollout steps = (counter mod max) + 1

A student iteration emits the sCM loss, and from iteration W on the DMD loss too; the trainer
backpropagates each as it comes (``student_losses`` is a generator, so the sCM graph is freed before
the rollout runs) and takes one optimizer step. A critic iteration emits ``critic_loss``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from rcm.losses.common import (
    check_callable,
    check_config,
    check_count,
    check_sample,
    draw_normal,
)
from rcm.losses.config import RCMConfig
from rcm.losses.dmd import backward_simulation, dmd_loss, fake_score_loss
from rcm.losses.scm import scm_loss
from rcm.models.trigflow import FrameCondition
from rcm.timing import phase

__all__ = [
    "critic_iteration_count",
    "critic_loss",
    "is_student_iteration",
    "rcm_phase",
    "rollout_steps",
    "student_iteration_count",
    "student_losses",
]


def _check_iteration(k: int, warmup: int, freq: int) -> None:
    check_count(k, "iteration")
    check_count(warmup, "warmup")
    check_count(freq, "freq", 1)


def is_student_iteration(k: int, warmup: int, freq: int) -> bool:
    """Every iteration of the warmup, then one in ``freq``: k < W or (k − W) mod freq = 0."""
    _check_iteration(k, warmup, freq)
    return k < warmup or (k - warmup) % freq == 0


def student_iteration_count(k: int, warmup: int, freq: int) -> int:
    """k_S: student iterations before iteration k (the EMA's n, the student rollout counter)."""
    _check_iteration(k, warmup, freq)
    return k if k < warmup else warmup + (k - warmup) // freq


def critic_iteration_count(k: int, warmup: int, freq: int) -> int:
    """k_D = k − k_S − 1: the critic rollout counter (0 at the first critic iteration)."""
    return k - student_iteration_count(k, warmup, freq) - 1


def rollout_steps(counter: int, max_steps: int) -> int:
    """(counter mod max_steps) + 1: rollouts cycle deterministically through 1..max_steps."""
    counter, max_steps = check_count(counter, "counter"), check_count(max_steps, "max_steps", 1)
    return counter % max_steps + 1


def rcm_phase(iteration: int, config: RCMConfig) -> str:
    """"student" or "critic": the schedule of ``config``; every iteration is "student" without DMD."""
    check_config(config, RCMConfig)
    student = is_student_iteration(iteration, config.scm.tangent_warmup, config.student_update_freq) \
        or not config.dmd_enabled
    return "student" if student else "critic"


def student_losses(student: Callable, teacher: Callable, fake_score: Callable | None, x0: Tensor,
                   context: Any, negative_context: Any = None, *, iteration: int,
                   config: RCMConfig = RCMConfig(), generator: torch.Generator | None = None,
                   jvp: Callable | None = None, condition: FrameCondition | None = None,
                   ) -> Iterator[tuple[str, Tensor, dict[str, Any]]]:
    """Yield ``(name, per-sample loss [B], diagnostics)`` of a student iteration: "scm", then "dmd".

    "scm" is skipped when its loss scale is 0 (DMD2 alone).
    "dmd" comes only with the regularizer enabled and from ``iteration >= tangent_warmup`` on; its
    rollout length follows the student counter k_S. Random draws come from ``generator`` in order.
    jvp: the sCM JVP pass (see ``scm_loss``); default ``scm_jvp`` over ``student``.
    condition: image-to-video conditioning of every network call, rollout included (docs/method.md §12).
    Raises ValueError if ``iteration`` is a critic iteration of the schedule.
    """
    check_sample(x0, "x0")
    check_callable(student, "student")
    check_callable(teacher, "teacher")
    if rcm_phase(iteration, config) != "student":
        raise ValueError(f"iteration {iteration} is a critic iteration of the rCM schedule "
                         f"(warmup {config.scm.tangent_warmup}, freq {config.student_update_freq})")
    if config.scm.loss_scale > 0:  # 0: DMD2 alone, no JVP pass at all
        loss, diagnostics = scm_loss(student, teacher, x0, context, negative_context, iteration=iteration,
                                     config=config.scm, generator=generator, jvp=jvp, condition=condition)
        yield "scm", loss, diagnostics
    if not config.dmd_enabled or iteration < config.scm.tangent_warmup:
        return
    if fake_score is None:
        raise ValueError("fake_score is required for the DMD term (set dmd.loss_scale=0 for pure sCM)")
    check_callable(fake_score, "fake_score")
    k_s = student_iteration_count(iteration, config.scm.tangent_warmup, config.student_update_freq)
    steps = rollout_steps(k_s, config.dmd.max_simulation_steps)
    noise = draw_normal(x0.shape, generator, x0.device, name="rollout noise")
    with phase("dmd.rollout"):
        G = backward_simulation(student, context, noise, steps, config=config.dmd, generator=generator,
                                with_grad=True, condition=condition)
    loss, diagnostics = dmd_loss(G, teacher, fake_score, context, negative_context, config=config.dmd,
                                 generator=generator, condition=condition)
    yield "dmd", loss, {**diagnostics, "rollout_steps": steps}


def critic_loss(student: Callable, fake_score: Callable, x0: Tensor, context: Any, *, iteration: int,
                config: RCMConfig = RCMConfig(), generator: torch.Generator | None = None,
                condition: FrameCondition | None = None) -> tuple[Tensor, dict[str, Any]]:
    """Per-sample fake-score loss [B] of a critic iteration, and diagnostics.

    The student rolls out (no grad) for (k_D mod max) + 1 steps; ``x0`` only gives the sample shape.
    condition: image-to-video conditioning of the rollout and the critic (docs/method.md §12).
    Raises ValueError if ``iteration`` is a student iteration of the schedule.
    """
    check_sample(x0, "x0")
    check_callable(student, "student")
    check_callable(fake_score, "fake_score")
    if rcm_phase(iteration, config) != "critic":
        raise ValueError(f"iteration {iteration} is not a critic iteration of the rCM schedule "
                         f"(dmd enabled: {config.dmd_enabled}, warmup {config.scm.tangent_warmup}, "
                         f"freq {config.student_update_freq})")
    k_d = critic_iteration_count(iteration, config.scm.tangent_warmup, config.student_update_freq)
    steps = rollout_steps(k_d, config.dmd.max_simulation_steps)
    noise = draw_normal(x0.shape, generator, x0.device, name="rollout noise")
    with phase("critic.rollout"), torch.no_grad():
        G = backward_simulation(student, context, noise, steps, config=config.dmd, generator=generator,
                                condition=condition)
    loss, diagnostics = fake_score_loss(G, fake_score, context, config=config.dmd, generator=generator,
                                        condition=condition)
    return loss, {**diagnostics, "rollout_steps": steps}
