"""Samplers on a Gaussian data distribution, whose velocity and consistency function are exact.

Data x0 ~ N(μ, diag(sd²)). At RF time ρ, x_ρ ~ N((1 − ρ)μ, (1 − ρ)² sd² + ρ²) and the exact velocity
E[ε − x0 | x_ρ] is affine in x_ρ; the PF-ODE keeps each coordinate's z-score, so the consistency
function (ODE solution map to t = 0) is f(x_t, t) = μ + sd (x_t − cos t μ)/√(cos² t sd² + sin² t).
"""
import math

import numpy as np
import pytest
import torch

from rcm.models.trigflow import rf_to_trig, trig_to_rf
from rcm.samplers import (
    DEFAULT_MID_TIMES,
    consistency_times,
    sample_consistency,
    sample_euler,
    sample_unipc,
    shifted_flow_times,
    student_denoiser,
    teacher_velocity,
)

f64 = torch.float64
MU = torch.linspace(-2.0, 2.0, 8, dtype=f64)
SD = torch.linspace(0.5, 2.0, 8, dtype=f64)


def gaussian_velocity(x, rho):
    r = rho.reshape(-1, *([1] * (x.ndim - 1))).to(f64)
    var = (1 - r) ** 2 * SD ** 2 + r ** 2
    centered = x - (1 - r) * MU
    eps_mean = r / var * centered
    x0_mean = MU + (1 - r) * SD ** 2 / var * centered
    return eps_mean - x0_mean


def gaussian_consistency(x_t, t):
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    return MU + SD * (x_t - c * MU) / torch.sqrt(c ** 2 * SD ** 2 + s ** 2)


# ------------------------------------------------------------------------------------------------
# schedules


def test_consistency_times():
    t_max = math.atan(80.0)
    torch.testing.assert_close(consistency_times(1), torch.tensor([t_max, 0.0], dtype=f64))
    torch.testing.assert_close(consistency_times(4), torch.tensor([t_max, 1.5, 1.4, 1.0, 0.0], dtype=f64))
    assert consistency_times(1)[0] == pytest.approx(1.55830, abs=1e-5)
    # the RF form of the inference script (docs/method.md §5.2)
    rf = trig_to_rf(consistency_times(4))
    torch.testing.assert_close(rf, torch.tensor([0.98765, 0.93378, 0.85290, 0.60898, 0.0], dtype=f64),
                               rtol=0, atol=1e-5)
    assert consistency_times(2, sigma_max=200.0)[0] == pytest.approx(math.atan(200.0))
    assert consistency_times(1, sigma_max=math.inf)[0] == math.pi / 2
    torch.testing.assert_close(consistency_times(6, mid_times=[1.5, 1.3, 1.0, 0.6, 0.3, 0.1]),
                               torch.tensor([t_max, 1.5, 1.3, 1.0, 0.6, 0.3, 0.0], dtype=f64))
    assert DEFAULT_MID_TIMES == (1.5, 1.4, 1.0)
    with pytest.raises(ValueError, match="mid_times"):
        consistency_times(5)
    with pytest.raises(ValueError, match="mid_times"):
        consistency_times(3, mid_times=[1.2])
    with pytest.raises(ValueError, match="decrease"):
        consistency_times(2, sigma_max=10.0, mid_times=[1.5])  # arctan 10 = 1.47 < 1.5
    with pytest.raises(ValueError):
        consistency_times(0)


def test_shifted_flow_times():
    rho = shifted_flow_times(50, shift=5.0, sigma_max=5000.0)
    assert rho.shape == (51,) and rho.dtype == f64 and rho[-1] == 0
    assert rho[0] == pytest.approx(5000 / 5001, rel=1e-12)  # starts at ρ_max after the round trip
    assert (rho[1:] < rho[:-1]).all()
    u = torch.linspace(float(rho[0] / (5 - 4 * rho[0])), 0, 51, dtype=f64)[:-1]
    torch.testing.assert_close(rho[:-1], 5 * u / (1 + 4 * u))
    unshifted = shifted_flow_times(4, shift=1.0, sigma_max=1.0)
    torch.testing.assert_close(unshifted, torch.tensor([0.5, 0.375, 0.25, 0.125, 0.0], dtype=f64))


# ------------------------------------------------------------------------------------------------
# teacher samplers


def _output_distribution(sampler, num_steps, sigma_max=1e4):
    """The velocity is affine in x, so a sampler is an affine map x_N = A z + b: its samples are exactly
    N(b, diag A²). Returns (b, A) and the exact flow's (b, A) from the same start x = z at ρ_0."""
    rho = shifted_flow_times(num_steps, sigma_max=sigma_max)
    b = sampler(gaussian_velocity, torch.zeros(1, 8, dtype=f64), rho)[0]
    A = sampler(gaussian_velocity, torch.ones(1, 8, dtype=f64), rho)[0] - b
    r0 = float(rho[0])
    A_exact = SD / torch.sqrt((1 - r0) ** 2 * SD ** 2 + r0 ** 2)  # z-score is preserved along the ODE
    return (b, A), (MU - A_exact * (1 - r0) * MU, A_exact)


def _error(sampler, num_steps):
    (b, A), (b_exact, A_exact) = _output_distribution(sampler, num_steps)
    return float((b - b_exact).abs().max() + (A ** 2 - A_exact ** 2).abs().max())


def test_euler_and_unipc_converge_to_the_gaussian():
    steps = [4, 8, 16, 32]
    euler = [_error(sample_euler, n) for n in steps]
    unipc = [_error(sample_unipc, n) for n in steps]
    assert all(a > b for a, b in zip(euler, euler[1:])), euler
    assert all(a > b for a, b in zip(unipc, unipc[1:])), unipc
    assert all(u < e for u, e in zip(unipc, euler)), (unipc, euler)
    assert unipc[-1] < 0.5 * euler[-1]
    # and the samples are the data distribution: mean μ, covariance diag(sd²)
    for sampler, tol in ((sample_euler, 0.25), (sample_unipc, 0.02)):
        (b, A), _ = _output_distribution(sampler, 64)
        torch.testing.assert_close(b, MU, rtol=0, atol=2e-3)
        torch.testing.assert_close(A ** 2, SD ** 2, rtol=0, atol=tol)


def test_unipc_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for num_steps, order in ((3, 2), (7, 2), (7, 3)):
        rho = shifted_flow_times(num_steps, sigma_max=100.0)
        scheduler = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=order,
            solver_type="bh2", lower_order_final=True, predict_x0=True)
        scheduler.set_timesteps(sigmas=np.array(rho[:-1].tolist()))
        z = torch.randn(3, 8, dtype=f64, generator=torch.Generator().manual_seed(num_steps))
        x = z.clone()
        for i, timestep in enumerate(scheduler.timesteps):
            v = gaussian_velocity(x, scheduler.sigmas[i].to(f64).expand(3))
            x = scheduler.step(v, timestep, x).prev_sample
        ours = sample_unipc(gaussian_velocity, z, scheduler.sigmas.to(f64), order=order)  # same fp32 sigmas
        torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


def test_teacher_velocity_guidance_and_progress():
    calls = []

    def net(x, timestep, context):
        calls.append((x.dtype, timestep.clone()))
        return x * context[:, None]

    z = torch.randn(2, 8, dtype=f64)
    cond, neg = torch.tensor([1.0, 2.0], dtype=f64), torch.tensor([0.5, 0.5], dtype=f64)
    velocity = teacher_velocity(net, cond, guidance=3.0, negative_context=neg)
    rho = torch.tensor([0.7, 0.7], dtype=f64)
    torch.testing.assert_close(velocity(z, rho), z * (0.5 + 3.0 * (cond - 0.5))[:, None])
    torch.testing.assert_close(calls[-1][1], 1000 * rho)  # network timestep is 1000ρ
    with pytest.raises(ValueError, match="negative_context"):
        teacher_velocity(net, cond, guidance=5.0)
    seen = []
    times = shifted_flow_times(5)
    for sampler in (sample_euler, sample_unipc):
        seen.clear()
        sampler(velocity, z, times, progress=lambda i, n: seen.append((i, n)))
        assert seen == [(i, 5) for i in range(1, 6)]
    with pytest.raises(ValueError, match="rf_times"):
        sample_euler(velocity, z, torch.tensor([0.5, 0.7, 0.0], dtype=f64))
    with pytest.raises(ValueError, match="rf_times"):
        sample_unipc(velocity, z, torch.tensor([0.9, 0.5], dtype=f64))


# ------------------------------------------------------------------------------------------------
# consistency sampler


def test_consistency_sampler_with_exact_consistency_function_is_exact_in_one_step():
    z = torch.randn(1000, 8, dtype=f64, generator=torch.Generator().manual_seed(0))
    x = sample_consistency(gaussian_consistency, z, consistency_times(1, sigma_max=math.inf))
    torch.testing.assert_close(x, MU + SD * z, rtol=0, atol=1e-12)  # x_{π/2} = ε exactly: f maps it to data

    # the same through the TrigFlow wrapper: a network whose x̂0 is the exact consistency function
    def exact_student(x_rho, timestep, context):
        rho = timestep / 1000
        t = rf_to_trig(rho)
        x_t = x_rho * (torch.cos(t) + torch.sin(t))[:, None]
        return (x_rho - gaussian_consistency(x_t, t)) / rho[:, None]  # x̂0 = x_ρ − ρ v = f

    x = sample_consistency(student_denoiser(exact_student, None), z, consistency_times(1, sigma_max=math.inf))
    torch.testing.assert_close(x, MU + SD * z, rtol=0, atol=1e-9)


def test_consistency_sampler_multistep_renoising():
    n = 40000
    z = torch.randn(n, 8, dtype=f64, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    seen = []
    x = sample_consistency(gaussian_consistency, z, consistency_times(4, sigma_max=math.inf), generator=gen,
                           progress=lambda i, k: seen.append((i, k)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)] and x.dtype == f64
    # every step lands exactly on the data distribution; re-noising draws fresh noise (x ≠ μ + sd z)
    se = SD / math.sqrt(n)
    assert ((x.mean(0) - MU).abs() < 5 * se).all()
    assert ((x.std(0) / SD - 1).abs() < 0.03).all()
    assert (x - (MU + SD * z)).abs().mean() > 0.1

    # the last step's x̂0 is returned, and the re-noise is cos t_{i+1} x̂0 + sin t_{i+1} z'
    def record(x_t, t):
        record.inputs.append(x_t.clone())
        return torch.full_like(x_t, 0.5)

    record.inputs = []
    gen = torch.Generator().manual_seed(3)
    out = sample_consistency(record, z[:4], torch.tensor([math.pi / 2, 1.0, 0.0], dtype=f64), generator=gen)
    z1 = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).double()
    torch.testing.assert_close(record.inputs[0], z[:4])  # start at x = z
    torch.testing.assert_close(record.inputs[1], math.cos(1.0) * 0.5 + math.sin(1.0) * z1)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    with pytest.raises(ValueError, match="generator"):
        sample_consistency(record, z[:4], torch.tensor([1.5, 1.0, 0.0], dtype=f64))
    with pytest.raises(ValueError, match="times"):
        sample_consistency(record, z[:4], torch.tensor([1.0, 1.5, 0.0], dtype=f64))
