"""Losses: time distributions, sCM target and guard, DMD gradient, critic, rollout, schedule, EMA."""
import copy
import math

import pytest
import torch
from torch import nn

from rcm.losses import (
    DMDConfig,
    LogNormalTime,
    RCM_PRESETS,
    RCMConfig,
    SCMConfig,
    UniformShiftTime,
    backward_simulation,
    critic_iteration_count,
    critic_loss,
    dmd_loss,
    ema_update_,
    fake_score_loss,
    is_student_iteration,
    normalize_tangent,
    power_ema_beta,
    power_ema_gamma,
    rcm_phase,
    rollout_steps,
    rollout_times,
    scm_jvp,
    scm_loss,
    scm_target,
    student_iteration_count,
    student_losses,
    tangent_warmup_ratio,
)
from rcm.models.trigflow import FunctionalNet, trigflow_denoise

f64 = torch.float64
SHAPE = (2, 1, 2, 2)  # C, T, H, W


class TinyVelocityNet(nn.Module):
    """Per-sample nonlinear velocity field; ``context`` [B] is added to v (a per-sample offset)."""

    def __init__(self, dim: int = 8, hidden: int = 32, dtype=f64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(dim + 2, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, dim, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, x, timestep, context):
        tau = timestep[:, None] / 1000
        h = torch.cat([x.flatten(1), torch.sin(3 * tau), tau ** 2], dim=1).to(self.inp.weight.dtype)
        v = self.out(torch.tanh(self.inp(h))).view_as(x)
        return v if context is None else v + context.reshape(-1, *([1] * (x.ndim - 1))).to(v.dtype)


def _bc(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def _draws(B=4, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    noise = torch.randn(B, *SHAPE, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=f64) * 1.3 + 0.15
    return x0, noise, t


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


# ------------------------------------------------------------------------------------------------
# time distributions


def test_lognormal_time_is_arctan_of_lognormal_sigma():
    t = LogNormalTime(0.7, 1.6).sample(5000, torch.Generator().manual_seed(3))
    n = torch.randn(5000, generator=torch.Generator().manual_seed(3)).double()  # fp32 draw, then f64
    assert t.dtype == f64 and t.shape == (5000,)
    torch.testing.assert_close(t, torch.atan(torch.exp(0.7 + 1.6 * n)), rtol=0, atol=1e-12)
    assert (t >= 0).all() and (t < math.pi / 2).all()
    # quantiles at n = -1, 0, 1 (docs/method.md §2.1): 0.386, 1.110, 1.471
    q = torch.quantile(t, torch.tensor([0.158655, 0.5, 0.841345], dtype=f64))
    torch.testing.assert_close(q, torch.tensor([0.386, 1.110, 1.471], dtype=f64), rtol=0, atol=0.03)


def test_uniform_shift_time():
    t = UniformShiftTime(5.0).sample(20000, torch.Generator().manual_seed(4))
    u = torch.rand(20000, generator=torch.Generator().manual_seed(4)).double()
    assert t.dtype == f64
    torch.testing.assert_close(torch.tan(t), 5 * u / (1 - u), rtol=1e-10, atol=1e-12)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=f64))
    torch.testing.assert_close(q, torch.tensor([0.507, 1.373, 1.549], dtype=f64), rtol=0, atol=0.02)


def test_configs_defaults_and_validation():
    cfg = RCMConfig()
    assert (cfg.scm.loss_scale, cfg.scm.guidance, cfg.scm.tangent_warmup, cfg.scm.tangent_norm_eps) == (100.0, 5.0, 1000, 0.1)
    assert cfg.scm.time_dist == LogNormalTime(0.7, 1.6) and cfg.dmd.time_dist == UniformShiftTime(5.0)
    assert (cfg.dmd.loss_scale, cfg.dmd.max_simulation_steps, cfg.student_update_freq) == (1.0, 4, 5)
    big = RCM_PRESETS["wan2.1-t2v-14b"]
    assert big.scm.time_dist == LogNormalTime(1.5, 1.6) and big.scm.tangent_warmup == 0
    assert big.student_update_freq == 10
    for bad in (lambda: SCMConfig(loss_scale=-1.0), lambda: SCMConfig(tangent_warmup=-1),
                lambda: DMDConfig(max_simulation_steps=0), lambda: DMDConfig(critic_max_weight=0.0),
                lambda: RCMConfig(student_update_freq=0), lambda: LogNormalTime(0.0, -1.0),
                lambda: DMDConfig(backward_timesteps=(2.0,))):
        with pytest.raises(ValueError):
            bad()


# ------------------------------------------------------------------------------------------------
# sCM


def test_tangent_warmup_ratio_and_normalization():
    assert tangent_warmup_ratio(500, 1000) == 0.5
    assert tangent_warmup_ratio(5000, 1000) == 1.0 and tangent_warmup_ratio(3, 0) == 1.0
    with pytest.raises(ValueError):
        tangent_warmup_ratio(-1, 10)
    g = torch.randn(3, *SHAPE).float()
    g_hat = normalize_tangent(g, 0.1)
    assert g_hat.dtype == f64
    norms = g.double().flatten(1).norm(dim=1)
    torch.testing.assert_close(g_hat.flatten(1).norm(dim=1), norms / (norms + 0.1))


def test_scm_target_at_r1_is_c_times_df_dt_along_teacher_ode():
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x_t, _, t = _draws()
    ctx = torch.full((4,), 0.1, dtype=f64)
    F_tea = trigflow_denoise(teacher, x_t, t, ctx).F
    F_minus = trigflow_denoise(student, x_t, t, ctx).F
    cs_dF_dt = scm_jvp(student, x_t, t, ctx, F_tea)
    g = scm_target(x_t, t, F_tea, F_minus, cs_dF_dt, warmup_ratio=1.0)

    def f(x, tt):  # consistency function, built from x̂0 (not from F)
        return trigflow_denoise(student, x, tt, ctx).x0

    c, s = _bc(torch.cos(t), x_t), _bc(torch.sin(t), x_t)
    h = 1e-6  # central difference along dx/dt = F_tea
    df_dt_fd = (f(x_t + h * F_tea, t + h) - f(x_t - h * F_tea, t - h)) / (2 * h)
    torch.testing.assert_close(g, c * df_dt_fd, rtol=1e-6, atol=1e-7)
    _, df_dt = torch.func.jvp(f, (x_t, t), (F_tea, torch.ones_like(t)))
    torch.testing.assert_close(g, c * df_dt, rtol=1e-9, atol=1e-10)
    assert g.abs().max() > 1e-2

    # r < 1: the reference's warmup form, with dF/dt from finite differences
    r = 0.3
    dF_dt = (trigflow_denoise(student, x_t + h * F_tea, t + h, ctx).F
             - trigflow_denoise(student, x_t - h * F_tea, t - h, ctx).F) / (2 * h)
    expected = -c * torch.sqrt(1 - (r * s) ** 2) * (F_minus - F_tea) - r * c * s * x_t - c * s * dF_dt
    torch.testing.assert_close(scm_target(x_t, t, F_tea, F_minus, cs_dF_dt, warmup_ratio=r), expected,
                               rtol=1e-6, atol=1e-7)


def test_scm_loss_value_gradient_and_teacher_cfg():
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x0, noise, t = _draws()
    ctx, neg = torch.full((4,), 0.2, dtype=f64), torch.full((4,), -0.3, dtype=f64)
    cfg = SCMConfig(loss_scale=100.0, guidance=5.0, tangent_warmup=10)
    loss, diag = scm_loss(student, teacher, x0, ctx, neg, iteration=20, config=cfg, t=t, noise=noise)
    assert loss.shape == (4,) and loss.dtype == f64 and diag["warmup_ratio"] == 1.0 and diag["nonfinite"] == 0

    # independent pieces: x_t in f64, CFG on the teacher's F, g at r = 1
    c, s = _bc(torch.cos(t), x0), _bc(torch.sin(t), x0)
    x_t = c * x0 + s * noise
    F_c, F_u = (trigflow_denoise(teacher, x_t, t, k).F for k in (ctx, neg))
    F_tea = F_u + 5.0 * (F_c - F_u)
    F_theta = trigflow_denoise(student, x_t, t, ctx).F
    g = scm_target(x_t, t, F_tea, F_theta.detach(), scm_jvp(student, x_t, t, ctx, F_tea))
    g_hat = g / _bc(g.flatten(1).norm(dim=1) + 0.1, g)
    torch.testing.assert_close(loss, 100.0 * (g_hat ** 2).flatten(1).sum(1))
    torch.testing.assert_close(diag["g_norm"], g.flatten(1).norm(dim=1))

    # ∇θ L = −2λ Σ ĝ · ∂F_θ/∂θ
    loss.sum().backward()
    got = _grads(student)
    student.zero_grad()
    (-2 * 100.0 * (g_hat.detach() * trigflow_denoise(student, x_t, t, ctx).F).sum()).backward()
    for k, v in _grads(student).items():
        torch.testing.assert_close(got[k], v)
    assert all(p.grad is None for p in teacher.parameters())

    with pytest.raises(ValueError, match="negative_context"):
        scm_loss(student, teacher, x0, ctx, None, iteration=0, config=cfg, t=t, noise=noise)


def test_scm_nan_guard_zeroes_exactly_the_affected_sample():
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x0, noise, t = _draws()
    ctx = torch.tensor([0.1, 0.2, math.nan, -0.1], dtype=f64)  # sample 2 produces NaN velocities
    cfg = SCMConfig(guidance=1.0, tangent_warmup=0)
    loss, diag = scm_loss(student, teacher, x0, ctx, iteration=0, config=cfg, t=t, noise=noise)
    loss.sum().backward()
    grads = _grads(student)
    student.zero_grad()
    keep = torch.tensor([0, 1, 3])
    loss_ref, _ = scm_loss(student, teacher, x0[keep], ctx[keep], iteration=0, config=cfg, t=t[keep],
                           noise=noise[keep])
    loss_ref.sum().backward()
    assert diag["nonfinite"] == 1 and loss[2] == 0
    torch.testing.assert_close(loss[keep], loss_ref)
    for k, v in _grads(student).items():
        assert torch.isfinite(grads[k]).all()
        torch.testing.assert_close(grads[k], v)


def test_scm_nonfinite_input_sample_keeps_weight_gradients_clean():
    """NaN data never reaches the network: 0·NaN would otherwise poison every weight gradient."""
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x0, noise, t = _draws()
    x0[1, 0, 0, 0, 0] = math.nan
    cfg = SCMConfig(guidance=1.0, tangent_warmup=0)
    loss, diag = scm_loss(student, teacher, x0, None, iteration=0, config=cfg, t=t, noise=noise)
    loss.sum().backward()
    grads = _grads(student)
    student.zero_grad()
    keep = torch.tensor([0, 2, 3])
    loss_ref, _ = scm_loss(student, teacher, x0[keep], None, iteration=0, config=cfg, t=t[keep], noise=noise[keep])
    loss_ref.sum().backward()
    assert diag["nonfinite"] == 1 and loss[1] == 0
    torch.testing.assert_close(loss[keep], loss_ref)
    for k, v in _grads(student).items():
        torch.testing.assert_close(grads[k], v)


def test_rollout_and_dmd_isolate_a_nonfinite_sample():
    student, teacher, fake = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2), TinyVelocityNet(seed=3)
    noise = torch.randn(3, *SHAPE)
    noise[0, 1, 0, 0, 0] = math.inf
    G = backward_simulation(student, None, noise, 2, generator=torch.Generator().manual_seed(0))
    assert G[0].isnan().all() and G[1:].isfinite().all()
    _, dmd_noise, t = _draws(B=3, dtype=torch.float32)
    cfg = DMDConfig(guidance=1.0)
    grads = []
    for batch in (slice(0, 3), slice(1, 3)):  # one-step rollouts draw nothing: comparable batches
        student.zero_grad()
        G = backward_simulation(student, None, noise[batch], 1, with_grad=True)
        loss, diag = dmd_loss(G, teacher, fake, None, config=cfg, t=t[batch], noise=dmd_noise[batch])
        loss.sum().backward()
        grads.append(_grads(student))
    assert diag["nonfinite"] == 0
    for k, v in grads[0].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, grads[1][k])


def test_scm_loss_composes_with_torch_func_grad():
    """A pure function of the parameter dict: torch.func.grad gives the autograd gradient."""
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x0, noise, t = _draws()
    cfg = SCMConfig(guidance=1.0, tangent_warmup=0)
    params = {k: p.detach() for k, p in student.named_parameters()}

    def total(p):
        return scm_loss(FunctionalNet(student, p), teacher, x0, None, iteration=0, config=cfg, t=t,
                        noise=noise)[0].sum()

    grads = torch.func.grad(total)(params)
    scm_loss(student, teacher, x0, None, iteration=0, config=cfg, t=t, noise=noise)[0].sum().backward()
    for k, v in _grads(student).items():
        torch.testing.assert_close(grads[k], v)


def test_loss_input_validation():
    student, teacher = TinyVelocityNet(seed=1), TinyVelocityNet(seed=2)
    x0, noise, t = _draws()
    cfg = SCMConfig(guidance=1.0)
    with pytest.raises(ValueError, match="x0"):
        scm_loss(student, teacher, x0[0, 0, 0, 0], None, iteration=0, config=cfg, t=t, noise=noise)
    with pytest.raises(ValueError, match="t must be"):
        scm_loss(student, teacher, x0, None, iteration=0, config=cfg, t=t[:2], noise=noise)
    with pytest.raises(ValueError, match="noise"):
        scm_loss(student, teacher, x0, None, iteration=0, config=cfg, t=t, noise=noise[:, :1])
    with pytest.raises(ValueError, match="generator"):
        scm_loss(student, teacher, x0, None, iteration=0, config=cfg)
    with pytest.raises(ValueError, match="G must be"):
        fake_score_loss(x0.flatten(), student, None, t=t, noise=noise)


# ------------------------------------------------------------------------------------------------
# DMD and critic


def test_dmd_gradient_on_G_is_scaled_score_difference():
    teacher, fake = TinyVelocityNet(seed=2), TinyVelocityNet(seed=3)
    G0, noise, t = _draws(dtype=torch.float32)
    G = G0.clone().requires_grad_()
    ctx, neg = torch.full((4,), 0.2, dtype=f64), torch.full((4,), -0.3, dtype=f64)
    cfg = DMDConfig(loss_scale=0.7, guidance=5.0)
    loss, diag = dmd_loss(G, teacher, fake, ctx, neg, config=cfg, t=t, noise=noise)
    (grad_G,) = torch.autograd.grad(loss.sum(), G)

    x_D = _bc(torch.cos(t), G0) * G0.double() + _bc(torch.sin(t), G0) * noise.double()
    x0_fake = trigflow_denoise(fake, x_D, t, ctx).x0
    x0_c, x0_u = (trigflow_denoise(teacher, x_D, t, k).x0 for k in (ctx, neg))
    x0_real = x0_u + 5.0 * (x0_c - x0_u)
    omega = (G0.double() - x0_real).abs().flatten(1).mean(1)
    delta = (x0_fake - x0_real) / _bc(omega, G0)
    torch.testing.assert_close(diag["omega"], omega)
    torch.testing.assert_close(grad_G, (2 * 0.7 * delta).float())
    torch.testing.assert_close(loss, 0.7 * (delta ** 2).flatten(1).sum(1))
    assert all(p.grad is None for p in [*teacher.parameters(), *fake.parameters()])


def test_dmd_nan_guard():
    teacher, fake = TinyVelocityNet(seed=2), TinyVelocityNet(seed=3)
    G0, noise, t = _draws(dtype=torch.float32)
    G0[1, 0, 0, 0, 0] = math.nan
    G = G0.clone().requires_grad_()
    cfg = DMDConfig(guidance=1.0)
    loss, diag = dmd_loss(G, teacher, fake, None, config=cfg, t=t, noise=noise)
    (grad_G,) = torch.autograd.grad(loss.sum(), G)
    keep = torch.tensor([0, 2, 3])
    G_ref = G0[keep].clone().requires_grad_()
    loss_ref, _ = dmd_loss(G_ref, teacher, fake, None, config=cfg, t=t[keep], noise=noise[keep])
    (grad_ref,) = torch.autograd.grad(loss_ref.sum(), G_ref)
    assert diag["nonfinite"] == 1 and loss[1] == 0 and (grad_G[1] == 0).all()
    torch.testing.assert_close(loss[keep], loss_ref)
    torch.testing.assert_close(grad_G[keep], grad_ref)


def test_critic_loss_is_F_prediction_error():
    fake = TinyVelocityNet(seed=3)
    G, noise, t = _draws(dtype=torch.float32)
    G.requires_grad_()
    loss, diag = fake_score_loss(G, fake, None, config=DMDConfig(), t=t, noise=noise)
    c, s = _bc(torch.cos(t), G), _bc(torch.sin(t), G)
    x_D = c * G.detach().double() + s * noise.double()
    F_fake = trigflow_denoise(fake, x_D, t, None).F
    F_star = (c * x_D - G.detach().double()) / s  # the F of the clean sample G through x_D
    torch.testing.assert_close(loss, ((F_fake - F_star) ** 2).flatten(1).sum(1))
    loss.sum().backward()
    assert G.grad is None and fake.inp.weight.grad.abs().sum() > 0

    # 1/sin² t weight: capped by default, uncapped (the reference) with critic_max_weight=None
    t_small = torch.tensor([1e-4, 0.5, 1.0, 1.5], dtype=f64)
    _, capped = fake_score_loss(G, fake, None, config=DMDConfig(), t=t_small, noise=noise)
    _, ref = fake_score_loss(G, fake, None, config=DMDConfig(critic_max_weight=None), t=t_small, noise=noise)
    assert capped["weight"][0] == 1e4
    torch.testing.assert_close(ref["weight"], 1 / torch.sin(t_small) ** 2)
    torch.testing.assert_close(capped["weight"][1:], ref["weight"][1:])


# ------------------------------------------------------------------------------------------------
# rollout


class Recorder(nn.Module):
    """v = 0 (so x̂0 = x_t/(c + s)), recording whether grad was enabled on each call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros((), dtype=f64))
        self.grad_enabled = []

    def forward(self, x, timestep, context):
        self.grad_enabled.append(torch.is_grad_enabled())
        return self.scale * x


def test_rollout_times():
    cfg = DMDConfig()
    times = rollout_times(64, 4, config=cfg, generator=torch.Generator().manual_seed(0))
    assert times.shape == (5, 64) and times.dtype == f64
    assert (times[0] == math.pi / 2).all() and (times[-1] == 0).all()
    assert (times[1:] <= times[:-1]).all() and (times[1:-1] > 0).all()
    assert (times[2] < times[1]).any()  # random per sample, made non-increasing
    fixed = rollout_times(2, 4, config=DMDConfig(fix_timesteps=True))
    torch.testing.assert_close(fixed[:, 0], torch.tensor([math.pi / 2, 1.5, 1.4, 1.0, 0.0], dtype=f64))
    with pytest.raises(ValueError):
        rollout_times(2, 5, config=DMDConfig(fix_timesteps=True))


def test_backward_simulation_grad_only_on_last_call_and_renoising():
    net = Recorder()
    noise = torch.randn(3, *SHAPE)
    G = backward_simulation(net, None, noise, 3, generator=torch.Generator().manual_seed(0), with_grad=True)
    assert net.grad_enabled == [False, False, True] and G.requires_grad and G.dtype == torch.float32
    net.grad_enabled.clear()
    G = backward_simulation(net, None, noise, 2, generator=torch.Generator().manual_seed(0))
    assert net.grad_enabled == [False, False] and not G.requires_grad

    # x = ε at t0 = π/2: x̂0 = ε; x ← c1 ε + s1 z; G = x/(c1 + s1) (v = 0)
    gen = torch.Generator().manual_seed(0)
    times = rollout_times(3, 2, generator=gen)
    z = torch.randn(noise.shape, generator=gen)
    c1, s1 = _bc(torch.cos(times[1]), noise), _bc(torch.sin(times[1]), noise)
    expected = ((c1 * noise.double() + s1 * z.double()) / (c1 + s1)).float()
    torch.testing.assert_close(G, expected)


# ------------------------------------------------------------------------------------------------
# rCM schedule and objectives


def test_phase_schedule():
    W, freq = 1000, 5
    assert all(is_student_iteration(k, W, freq) for k in range(0, 1001))
    assert [is_student_iteration(k, W, freq) for k in range(1001, 1011)] == [False] * 4 + [True] + [False] * 4 + [True]
    assert [student_iteration_count(k, W, freq) for k in (5, 999, 1000, 1004, 1005, 1010)] == [5, 999, 1000, 1000, 1001, 1002]
    assert [critic_iteration_count(k, W, freq) for k in (1001, 1004, 1006, 1009)] == [0, 3, 4, 7]
    assert [rollout_steps(k, 4) for k in range(6)] == [1, 2, 3, 4, 1, 2]
    # 14B: no warmup, one student step in 10
    assert [is_student_iteration(k, 0, 10) for k in (0, 1, 9, 10)] == [True, False, False, True]
    assert critic_iteration_count(1, 0, 10) == 0 and critic_iteration_count(11, 0, 10) == 9
    pure_scm = RCMConfig(dmd=DMDConfig(loss_scale=0.0))
    assert rcm_phase(1003, RCMConfig()) == "critic" and rcm_phase(1003, pure_scm) == "student"


def test_student_losses_and_critic_loss_follow_the_schedule():
    student, teacher, fake = (TinyVelocityNet(seed=s, dtype=torch.float32) for s in (1, 2, 3))
    x0 = torch.randn(2, *SHAPE)
    ctx, neg = torch.zeros(2), torch.ones(2)
    cfg = RCMConfig(scm=SCMConfig(tangent_warmup=2), student_update_freq=2)
    gen = torch.Generator().manual_seed(0)

    def run(k):
        out = []
        for name, loss, diag in student_losses(student, teacher, fake, x0, ctx, neg, iteration=k, config=cfg,
                                               generator=gen):
            loss.sum().backward()  # each term is backpropagated as it comes
            out.append((name, diag.get("rollout_steps")))
        return out

    assert run(0) == [("scm", None)]  # warmup: sCM only
    assert run(2) == [("scm", None), ("dmd", 3)]  # k_S = 2 → 3 rollout steps
    assert run(4) == [("scm", None), ("dmd", 4)]  # k_S = 3
    assert student.inp.weight.grad.abs().sum() > 0 and fake.inp.weight.grad is None
    with pytest.raises(ValueError, match="critic iteration"):
        run(3)
    loss, diag = critic_loss(student, fake, x0, ctx, iteration=3, config=cfg, generator=gen)
    assert loss.shape == (2,) and diag["rollout_steps"] == 1  # k_D = 0
    loss.sum().backward()
    assert fake.inp.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a critic iteration"):
        critic_loss(student, fake, x0, ctx, iteration=2, config=cfg, generator=gen)
    with pytest.raises(ValueError, match="fake_score"):
        list(student_losses(student, teacher, None, x0, ctx, neg, iteration=2, config=cfg, generator=gen))
    pure_scm = RCMConfig(dmd=DMDConfig(loss_scale=0.0))
    names = [n for n, _, _ in student_losses(student, teacher, None, x0, ctx, neg, iteration=5000,
                                             config=pure_scm, generator=gen)]
    assert names == ["scm"]


# ------------------------------------------------------------------------------------------------
# EMA


def test_power_ema_constants():
    gamma = power_ema_gamma(0.1)
    assert gamma == pytest.approx(6.9372, abs=1e-4)
    t = 0.1 ** -2  # it is a root of the cubic
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - t) * gamma + (12 - t) == pytest.approx(0, abs=1e-9)
    assert power_ema_beta(100, gamma) == pytest.approx(0.924, abs=5e-4)
    assert power_ema_beta(1000, gamma) == pytest.approx(0.9921, abs=5e-5)
    assert power_ema_beta(0, gamma) == 0.0
    with pytest.raises(ValueError):
        power_ema_gamma(0.0)


def test_ema_update_in_place():
    live = TinyVelocityNet(seed=1, dtype=torch.bfloat16)
    ema = TinyVelocityNet(seed=2, dtype=torch.float32)
    before = {k: v.detach().clone() for k, v in ema.named_parameters()}
    ema_update_(ema, live, 0.9)
    for k, p in ema.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * before[k] + 0.1 * dict(live.named_parameters())[k].float())
        assert p.dtype == torch.float32
    ema_update_(ema, live, 0.0)  # β = 0 copies the live weights
    for k, p in ema.named_parameters():
        torch.testing.assert_close(p.detach(), dict(live.named_parameters())[k].float())
    ema_dict = {k: v.detach().clone() for k, v in ema.named_parameters()}
    live_dict = {k: torch.zeros_like(v) for k, v in ema_dict.items()}
    ema_update_(ema_dict, live_dict, 0.5)
    for k, v in ema_dict.items():
        torch.testing.assert_close(v, 0.5 * dict(ema.named_parameters())[k].detach())
    with pytest.raises(ValueError, match="differ"):
        ema_update_(ema_dict, {"inp.weight": live_dict["inp.weight"]}, 0.5)
    with pytest.raises(ValueError):
        ema_update_(copy.deepcopy(ema), live, 1.5)
