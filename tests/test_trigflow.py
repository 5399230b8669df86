"""TrigFlow wrapper: time maps, scalings, denoiser identities, JVP of the whole denoiser, CFG."""
import math

import pytest
import torch
from torch import nn

from rcm.models.trigflow import (
    Denoised,
    FunctionalNet,
    GuidedNet,
    classifier_free_guidance,
    network_dtype,
    rf_to_sigma,
    rf_to_trig,
    shift_rf_time,
    sigma_to_rf,
    sigma_to_trig,
    trig_to_rf,
    trig_to_sigma,
    trigflow_denoise,
    trigflow_scalings,
)

f64 = torch.float64


class TinyVelocityNet(nn.Module):
    """A small nonlinear velocity field v(x, timestep, context): MLP over x and a time feature."""

    def __init__(self, dim: int, hidden: int = 32, dtype=torch.float32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(dim + 2, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, x, timestep, context):
        tau = timestep[:, None] / 1000
        h = torch.cat([x.flatten(1), torch.sin(3 * tau), tau ** 2], dim=1).to(self.inp.weight.dtype)
        v = self.out(torch.tanh(self.inp(h))).view_as(x)
        return v if context is None else v + context.reshape(-1, *([1] * (x.ndim - 1)))


def _batch(B=4, shape=(2, 1, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, dtype=f64)
    t = torch.rand(B, generator=g, dtype=f64) * 1.4 + 0.08  # inside (0, π/2)
    return x, t


# ------------------------------------------------------------------------------------------------
# time maps


def test_time_maps_round_trip():
    t = torch.linspace(0.0, math.pi / 2 - 1e-3, 101, dtype=f64)
    sigma = trig_to_sigma(t)
    rho = trig_to_rf(t)
    torch.testing.assert_close(sigma_to_trig(sigma), t, rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma_to_rf(sigma), rho, rtol=0, atol=1e-12)
    torch.testing.assert_close(rf_to_sigma(rho), sigma, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rf_to_trig(rho), t, rtol=0, atol=1e-10)
    # ρ = s/(c + s) = tan t/(1 + tan t), and x_ρ = x_t/(c + s) is the RF interpolation
    torch.testing.assert_close(rho, torch.tan(t) / (1 + torch.tan(t)), rtol=0, atol=1e-12)
    x0, eps = torch.randn(2, 101, dtype=f64)
    c, s = torch.cos(t), torch.sin(t)
    torch.testing.assert_close((c * x0 + s * eps) / (c + s), (1 - rho) * x0 + rho * eps)
    # floats are accepted; ρ = 1 is clamped below 1 so t stays < π/2, and π/2 maps to ρ = 1
    assert isinstance(sigma_to_rf(3.0), torch.Tensor) and float(sigma_to_rf(3.0)) == 0.75
    assert math.isfinite(float(rf_to_sigma(1.0))) and float(rf_to_trig(1.0)) < math.pi / 2
    assert float(rf_to_trig(torch.tensor(1.0, dtype=f64))) == pytest.approx(math.pi / 2, abs=1e-7)
    assert float(trig_to_rf(math.pi / 2)) == pytest.approx(1.0, abs=1e-15)
    assert float(sigma_to_trig(math.inf)) == math.pi / 2


def test_shift():
    rho = torch.linspace(0, 1, 11, dtype=f64)
    shifted = shift_rf_time(rho, 5.0)
    torch.testing.assert_close(shifted, 5 * rho / (1 + 4 * rho))
    torch.testing.assert_close(shift_rf_time(shifted, 1 / 5.0), rho)  # inverse shift
    assert torch.equal(shift_rf_time(rho, 0.0), rho) and torch.equal(shift_rf_time(rho, -1.0), rho)
    assert float(shift_rf_time(0.5, 3.0)) == pytest.approx(0.75)


def test_scalings_and_their_time_derivatives():
    t = torch.linspace(0.01, math.pi / 2, 50, dtype=f64)
    c, s = torch.cos(t), torch.sin(t)
    c_skip, c_out, c_in, c_noise = trigflow_scalings(t.float())
    assert all(x.dtype == f64 for x in (c_skip, c_out, c_in, c_noise))
    torch.testing.assert_close(c_noise, 1000 * trig_to_rf(t.float().double()))
    torch.testing.assert_close(c_in, 1 / (c + s), rtol=1e-6, atol=0)  # t went through fp32
    # derivatives the JVP needs (docs/method.md §1.4), from torch.func.jvp on the scaling function
    _, dots = torch.func.jvp(lambda tt: tuple(trigflow_scalings(tt)), (t,), (torch.ones_like(t),))
    d_skip, d_out, d_in, d_noise = dots
    torch.testing.assert_close(d_in, (s - c) / (c + s) ** 2)
    torch.testing.assert_close(d_skip, (s - c) / (c + s) ** 2)
    torch.testing.assert_close(d_out, -1 / (c + s) ** 2)
    torch.testing.assert_close(d_noise, 1000 / (c + s) ** 2)


# ------------------------------------------------------------------------------------------------
# denoiser


def test_denoiser_identities():
    net = TinyVelocityNet(8, dtype=f64)
    x_t, t = _batch()
    out = trigflow_denoise(net, x_t, t, None)
    assert isinstance(out, Denoised) and out.x0.dtype == f64 and out.F.dtype == f64
    c, s = (torch.cos(t).view(-1, 1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1, 1))
    # closed form F equals the reference form (c x_t − x̂0)/s
    torch.testing.assert_close(out.F, (c * x_t - out.x0) / s, rtol=1e-10, atol=1e-10)
    # the consistency function f = c x_t − s F is x̂0
    torch.testing.assert_close(c * x_t - s * out.F, out.x0, rtol=1e-10, atol=1e-12)
    # x̂0 is the RF x0-prediction x_ρ − ρ v at ρ(t), network at (x_ρ, 1000ρ)
    rho = trig_to_rf(t).view(-1, 1, 1, 1, 1)
    x_rho = x_t / (c + s)
    v = net(x_rho, 1000 * trig_to_rf(t), None)
    torch.testing.assert_close(out.x0, x_rho - rho * v, rtol=1e-10, atol=1e-12)


def test_exact_velocity_recovers_data_and_ode():
    """With the true v = ε − x0 of a single point x0, x̂0 = x0 and F = c ε − s x0 exactly."""
    x_t, t = _batch(B=3, shape=(5,))
    x0 = torch.randn_like(x_t)
    c, s = torch.cos(t)[:, None], torch.sin(t)[:, None]
    eps = (x_t - c * x0) / s

    def point_mass(x, timestep, context):  # x is x_ρ, ε = (x_ρ − (1 − ρ) x0)/ρ
        rho = (timestep / 1000)[:, None]
        return (x - (1 - rho) * x0) / rho - x0

    out = trigflow_denoise(point_mass, x_t, t, None)
    torch.testing.assert_close(out.x0, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.F, c * eps - s * x0, rtol=1e-9, atol=1e-9)


def test_jvp_of_whole_denoiser_matches_central_differences():
    net = TinyVelocityNet(8, dtype=f64)
    x_t, t = _batch()
    g = torch.Generator().manual_seed(1)
    dx, dt = torch.randn(x_t.shape, generator=g, dtype=f64), torch.randn(t.shape, generator=g, dtype=f64)
    ctx = torch.randn(4, dtype=f64)

    def denoise(x, tt):
        return tuple(trigflow_denoise(net, x, tt, ctx))

    (x0, F), (dx0, dF) = torch.func.jvp(denoise, (x_t, t), (dx, dt))
    h = 1e-6
    plus, minus = denoise(x_t + h * dx, t + h * dt), denoise(x_t - h * dx, t - h * dt)
    torch.testing.assert_close(dx0, (plus[0] - minus[0]) / (2 * h), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dF, (plus[1] - minus[1]) / (2 * h), rtol=1e-6, atol=1e-7)
    assert dF.abs().max() > 1e-2  # a real, nonzero tangent
    # the time tangent alone is also right (the wrapper's c_in, c_noise, c_out all depend on t)
    _, dF_t = torch.func.jvp(lambda tt: trigflow_denoise(net, x_t, tt, ctx).F, (t,), (torch.ones_like(t),))
    fd = (trigflow_denoise(net, x_t, t + h, ctx).F - trigflow_denoise(net, x_t, t - h, ctx).F) / (2 * h)
    torch.testing.assert_close(dF_t, fd, rtol=1e-6, atol=1e-7)


def test_jvp_through_wan_dit():
    """The same JVP through a tiny fp64 Wan DiT (attention's forward-AD rule included)."""
    wan = pytest.importorskip("rcm.models.wan")
    cfg = wan.wan_config("wan-tiny", num_layers=1)
    torch.manual_seed(0)
    net = wan.WanDiT(cfg).to(f64)
    with torch.no_grad():  # the head is zero-initialized: give it weights so v depends on x and t
        net.head.head.weight.normal_(0, 0.05)
    x_t = torch.randn(2, cfg.in_dim, 1, 4, 4, dtype=f64)
    t = torch.tensor([0.4, 1.2], dtype=f64)
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, dtype=f64)
    dx, dt = torch.randn_like(x_t), torch.tensor([0.7, -0.3], dtype=f64)

    def F(x, tt):
        return trigflow_denoise(net, x, tt, ctx).F

    with torch.no_grad():
        _, dF = torch.func.jvp(F, (x_t, t), (dx, dt))
        h = 1e-6
        fd = (F(x_t + h * dx, t + h * dt) - F(x_t - h * dx, t - h * dt)) / (2 * h)
    torch.testing.assert_close(dF, fd, rtol=1e-5, atol=1e-6)


def test_precision_policy_casts():
    seen = {}

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, x, timestep, context):
            seen.update(x=x.dtype, timestep=timestep.dtype)
            return x * self.w

    x_t, t = _batch()
    out = trigflow_denoise(Recorder(), x_t.float(), t.float(), None)
    assert seen == {"x": torch.bfloat16, "timestep": torch.float32}  # timestep kept in fp32
    assert out.x0.dtype == f64 and out.F.dtype == f64
    assert network_dtype(Recorder()) == torch.bfloat16
    assert network_dtype(lambda x, ts, c: x) is None


def test_functional_net_uses_given_params():
    net = TinyVelocityNet(8)
    params = {k: torch.zeros_like(v) for k, v in net.named_parameters()}
    x_t, t = _batch()
    fnet = FunctionalNet(net, params)
    assert fnet.dtype == torch.float32
    torch.testing.assert_close(fnet(x_t.float(), 1000 * trig_to_rf(t).float(), None), torch.zeros_like(x_t).float())
    assert not torch.equal(trigflow_denoise(fnet, x_t, t, None).x0, trigflow_denoise(net, x_t, t, None).x0)
    # gradients reach the dict entries
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    trigflow_denoise(FunctionalNet(net, params), x_t, t, None).F.sum().backward()
    assert params["inp.weight"].grad is not None and params["inp.weight"].grad.abs().sum() > 0


def test_classifier_free_guidance():
    net = TinyVelocityNet(8, dtype=f64)
    x, t = _batch()
    ts = 1000 * trig_to_rf(t)
    cond, neg = torch.full((4,), 0.3, dtype=f64), torch.full((4,), -0.2, dtype=f64)
    guided = classifier_free_guidance(net, 5.0, neg)
    assert isinstance(guided, GuidedNet) and guided.dtype == f64
    v_c, v_u = net(x, ts, cond), net(x, ts, neg)
    torch.testing.assert_close(guided(x, ts, cond), v_u + 5.0 * (v_c - v_u))
    # CFG on v is CFG on x̂0 and on F
    d_c, d_u, d_g = (trigflow_denoise(n, x, t, cond) for n in (net, GuidedNet(net, neg, 1.0), guided))
    d_u = trigflow_denoise(net, x, t, neg)
    torch.testing.assert_close(d_g.F, d_u.F + 5.0 * (d_c.F - d_u.F))
    torch.testing.assert_close(d_g.x0, d_u.x0 + 5.0 * (d_c.x0 - d_u.x0))
    assert classifier_free_guidance(net, 1.0, None) is net  # w ≤ 1: conditional only
    with pytest.raises(ValueError, match="negative_context"):
        classifier_free_guidance(net, 5.0, None)  # never silently disabled


def test_input_validation():
    net = TinyVelocityNet(8, dtype=f64)
    x_t, t = _batch()
    with pytest.raises(ValueError, match="t must be"):
        trigflow_denoise(net, x_t, t[:3], None)
    with pytest.raises(ValueError, match="t must be"):
        trigflow_denoise(net, x_t, t[:, None], None)
    with pytest.raises(ValueError, match="x_t must be"):
        trigflow_denoise(net, x_t[0, 0, 0, 0], t[:1], None)
