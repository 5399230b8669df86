"""The power-function EMA of each method has the σ_rel asked for (docs/method.md §4, §3.1).

The EMA is linear in the student's weights, so feeding it the one-hot trajectory θ_j = e_j (student
update j moves only coordinate j) leaves in coordinate j the weight w_j that update j carries in the
average. The reference counts n over the student updates: k_S (§3.1) when a fake score alternates with
the student, the raw iteration when every iteration is a student one (sCM alone). With the right n the
profile over the student updates is the power function with that σ_rel: std(profile) / N = σ_rel.
"""

import math

import pytest
import torch

from rcm.losses import DMDConfig, RCMConfig, SCMConfig, ema_update_, power_ema_beta, power_ema_gamma, rcm_phase
from rcm.train import ema_step_count, method_config

BASE = RCMConfig(scm=SCMConfig(tangent_warmup=100), dmd=DMDConfig(), student_update_freq=3)


def _profile(loss: RCMConfig, iterations: int, sigma_rel: float) -> torch.Tensor:
    """The weight of each student update in the EMA after `iterations` iterations, in float64."""
    gamma = power_ema_gamma(sigma_rel)
    updates = [k for k in range(iterations) if rcm_phase(k, loss) == "student"]
    ema = torch.zeros(len(updates), dtype=torch.float64)
    for j, k in enumerate(updates):
        theta = torch.zeros_like(ema)
        theta[j] = 1.0
        ema_update_({"w": ema}, {"w": theta}, power_ema_beta(ema_step_count(k, loss), gamma))
    return ema


def _sigma_rel(weights: torch.Tensor) -> float:
    """std of the averaging profile over the update index (1..N), relative to N."""
    n = len(weights)
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mean = (weights * t).sum() / weights.sum()
    return math.sqrt(float((weights * (t - mean) ** 2).sum() / weights.sum())) / n


@pytest.mark.parametrize("method", ["scm", "rcm", "dmd2"])
@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_each_method_has_the_sigma_rel_asked_for(method, sigma_rel):
    loss = method_config(method, BASE)
    weights = _profile(loss, 3000, sigma_rel)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)  # an average
    assert abs(_sigma_rel(weights) - sigma_rel) < 0.02 * sigma_rel + 2e-3, (method, _sigma_rel(weights))


def test_step_count_is_the_reference_rule():
    scm, rcm = method_config("scm", BASE), method_config("rcm", BASE)
    # sCM alone: every iteration is a student update, counted raw (past the tangent warmup too)
    assert [ema_step_count(k, scm) for k in (0, 99, 100, 101, 1000)] == [0, 99, 100, 101, 1000]
    # rCM: the student counter k_S = W + (k - W) // freq after the warmup W
    assert [ema_step_count(k, rcm) for k in (0, 99, 100, 103, 1000)] == [0, 99, 100, 101, 400]


def test_counting_student_iterations_for_scm_would_shrink_sigma_rel():
    """The old rule (k_S for sCM too) repeats and slows n: the average is far narrower than asked."""
    from rcm.losses import student_iteration_count

    loss, gamma = method_config("scm", BASE), power_ema_gamma(0.1)
    ema = torch.zeros(3000, dtype=torch.float64)
    for k in range(3000):
        theta = torch.zeros_like(ema)
        theta[k] = 1.0
        n = student_iteration_count(k, loss.scm.tangent_warmup, loss.student_update_freq)
        ema_update_({"w": ema}, {"w": theta}, power_ema_beta(n, gamma))
    assert _sigma_rel(ema) < 0.05  # the measurement tells the two rules apart
