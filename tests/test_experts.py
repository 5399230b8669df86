"""Two-expert networks (Wan2.2 A14B style) in the losses, rollout and samplers (docs/method.md §12.3):
``TimeSwitchedNet`` dispatches per sample by RF time; every loss then routes each sample to the right
teacher, student and critic expert, and the rollout crosses the boundary from one student to the other."""
import math

import pytest
import torch

from rcm.losses import (
    DMDConfig,
    SCMConfig,
    backward_simulation,
    dmd_loss,
    fake_score_loss,
    scm_jvp,
    scm_loss,
)
from rcm.models.trigflow import (
    FrameCondition,
    TimeSwitchedNet,
    trig_to_rf,
    trigflow_denoise,
)
from rcm.samplers import sample_euler, shifted_flow_times, teacher_velocity
from tests.test_conditioning import (
    MASK,
    Recorder,
    ToyVideoNet,
    draws,
    frame_condition,
    given,
)

f64 = torch.float64
B = 3
BOUNDARY = 0.875  # Wan2.2 A14B T2V's RF boundary


def rf(t):
    return trig_to_rf(torch.as_tensor(t, dtype=f64))


def experts(seed):
    return Recorder(ToyVideoNet(seed=seed)), Recorder(ToyVideoNet(seed=seed + 1))


def test_time_switched_net_dispatches_each_sample_by_its_time():
    high, low = experts(0)
    net = TimeSwitchedNet(high, low, BOUNDARY)
    x = draws(0)[0]
    timestep = torch.tensor([900.0, 875.0, 874.999], dtype=f64)  # at the boundary: high (Wan's >=)
    context = torch.randn(B, dtype=f64)
    out = net(x, timestep, context)
    assert [c[1].tolist() for c in high.calls] == [[900.0, 875.0]] and [c[1].tolist() for c in low.calls] == [[874.999]]
    expected = torch.cat([high.net(x[:2], timestep[:2], context[:2]), low.net(x[2:], timestep[2:], context[2:])])
    assert torch.equal(out, expected)
    # order restored for an interleaved batch; one side only: one call, no split
    high.calls.clear(), low.calls.clear()
    timestep = torch.tensor([100.0, 990.0, 300.0], dtype=f64)
    out = net(x, timestep, context)
    for i, expert in enumerate([low, high, low]):
        torch.testing.assert_close(out[i:i + 1], expert.net(x[i:i + 1], timestep[i:i + 1], context[i:i + 1]),
                                   rtol=1e-14, atol=0)
    net(x, torch.full((B,), 950.0, dtype=f64), context)
    assert len(high.calls) == 2 and len(low.calls) == 1
    # a per-frame map (frame replacement) goes by the sample's largest time, its generated frames
    high.calls.clear(), low.calls.clear()
    frame_map = torch.where(MASK, 0.0, torch.tensor([950.0, 500.0, 880.0], dtype=f64).view(B, 1, 1, 1, 1))
    net(x, frame_map, None)
    assert high.calls[0][1].shape == (2, 1, 3, 1, 1) and low.calls[0][1].shape == (1, 1, 3, 1, 1)
    with pytest.raises(ValueError, match="boundary must be an RF time"):
        TimeSwitchedNet(high, low, 1.5)(x, timestep, context)


def test_rollout_crosses_the_boundary_from_the_high_to_the_low_student():
    high, low = experts(2)
    student = TimeSwitchedNet(high, low, BOUNDARY)
    # per sample times: sample 2 crosses one step later than the others
    times = torch.tensor([[math.pi / 2] * 3, [1.5, 1.5, 1.5], [1.4, 1.4, 1.48], [1.0, 1.0, 1.0], [0.0] * 3], dtype=f64)
    rho = rf(times[:-1])
    assert bool((rho[:2] >= BOUNDARY).all()) and bool((rho[3] < BOUNDARY).all())
    assert bool(rho[2, 2] >= BOUNDARY) and bool((rho[2, :2] < BOUNDARY).all())
    condition = frame_condition(1)
    G = backward_simulation(student, None, draws(3)[0], 4, times=times, condition=condition,
                            generator=torch.Generator().manual_seed(0))
    high_steps = [c[1].flatten(1).amax(1).tolist() for c in high.calls]
    low_steps = [c[1].flatten(1).amax(1).tolist() for c in low.calls]
    expected_high = [(1000 * rho[i][rho[i] >= BOUNDARY]).tolist() for i in range(4) if bool((rho[i] >= BOUNDARY).any())]
    expected_low = [(1000 * rho[i][rho[i] < BOUNDARY]).tolist() for i in range(4) if bool((rho[i] < BOUNDARY).any())]
    assert len(high_steps) == 3 and len(low_steps) == 2  # steps 0, 1, 2 (sample 2) / steps 2 (samples 0-1), 3
    for seen, want in zip(high_steps + low_steps, expected_high + expected_low):
        torch.testing.assert_close(torch.tensor(seen, dtype=f64), torch.tensor(want, dtype=f64), rtol=1e-6, atol=0)
    assert torch.equal(given(G).to(f64), given(condition.latent).to(torch.float32).to(f64))


def _per_sample(loss_fn, switched, plain_of_sample, n=B):
    """The batch loss with switched networks equals, per sample, the loss of that sample alone with the
    plain expert networks of its time."""
    batch = loss_fn(*switched, rows=slice(None))
    for i in range(n):
        alone = loss_fn(*plain_of_sample(i), rows=slice(i, i + 1))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-12, atol=1e-14)


def test_scm_dmd_and_critic_send_each_sample_to_its_experts():
    teacher_h, teacher_l = ToyVideoNet(seed=4), ToyVideoNet(seed=5)
    student_h, student_l = ToyVideoNet(seed=6), ToyVideoNet(seed=7)
    fake_h, fake_l = ToyVideoNet(seed=8), ToyVideoNet(seed=9)
    teacher = TimeSwitchedNet(teacher_h, teacher_l, BOUNDARY)
    student = TimeSwitchedNet(student_h, student_l, BOUNDARY)
    fake = TimeSwitchedNet(fake_h, fake_l, BOUNDARY)
    t = torch.tensor([1.52, 0.7, 1.3], dtype=f64)  # ρ ≈ 0.95 (high), 0.46, 0.78 (low)
    high = rf(t) >= BOUNDARY
    assert high.tolist() == [True, False, False]
    x0, noise, _ = draws(5)
    condition = frame_condition(2)

    def pick(i):
        return (teacher_h, student_h, fake_h) if bool(high[i]) else (teacher_l, student_l, fake_l)

    def sub(c, rows):
        return FrameCondition(c.latent[rows], c.mask[rows])

    def scm(teacher, student, fake, rows):
        return scm_loss(student, teacher, x0[rows], None, iteration=0, config=SCMConfig(guidance=1.0, tangent_warmup=0),
                        t=t[rows], noise=noise[rows], condition=sub(condition, rows))[0]

    def dmd(teacher, student, fake, rows):
        return dmd_loss(x0[rows], teacher, fake, None, config=DMDConfig(guidance=1.0), t=t[rows], noise=noise[rows],
                        condition=sub(condition, rows))[0]

    def critic(teacher, student, fake, rows):
        return fake_score_loss(x0[rows], fake, None, t=t[rows], noise=noise[rows], condition=sub(condition, rows))[0]

    for loss_fn in (scm, dmd, critic):
        _per_sample(loss_fn, (teacher, student, fake), pick)
    # and the experts do differ, so a wrong routing would show
    wrong = scm(teacher_l, student_l, fake_l, slice(0, 1))
    assert not torch.allclose(wrong, scm(teacher_h, student_h, fake_h, slice(0, 1)))


def test_scm_jvp_through_switched_student_is_each_experts_own():
    student_h, student_l = ToyVideoNet(seed=10), ToyVideoNet(seed=11)
    student = TimeSwitchedNet(student_h, student_l, BOUNDARY)
    x_t, F_teacher, _ = draws(6)
    t = torch.tensor([1.5, 0.4, 1.45], dtype=f64)
    condition = frame_condition(3)
    tangent = scm_jvp(student, x_t, t, None, F_teacher, condition=condition)
    for i in range(B):
        expert = student_h if bool(rf(t[i]) >= BOUNDARY) else student_l
        own = scm_jvp(expert, x_t[i:i + 1], t[i:i + 1], None, F_teacher[i:i + 1],
                      condition=FrameCondition(condition.latent[i:i + 1], condition.mask[i:i + 1]))
        torch.testing.assert_close(tangent[i:i + 1], own, rtol=1e-12, atol=1e-14)


def test_teacher_sampler_switches_experts_at_the_boundary():
    high, low = experts(12)
    rf_times = shifted_flow_times(6, shift=5.0)
    velocity = teacher_velocity(TimeSwitchedNet(high, low, BOUNDARY), None)
    sample_euler(velocity, draws(7)[0], rf_times)
    seen_high = [float(c[1][0]) for c in high.calls]
    seen_low = [float(c[1][0]) for c in low.calls]
    assert seen_high == [1000 * r for r in rf_times[:-1].tolist() if r >= BOUNDARY]
    assert seen_low == [1000 * r for r in rf_times[:-1].tolist() if r < BOUNDARY]
    assert seen_high and seen_low



def test_per_expert_guidance_composes():
    """Wan2.2 guides each expert with its own weight: a TimeSwitchedNet of two GuidedNets (the loss's
    guidance at 1) gives each sample its expert's guided velocity, image inputs in both passes, on a
    batch that straddles the boundary (the negative context is split with the rows)."""
    from rcm.models.trigflow import classifier_free_guidance, network_velocity

    cy = 1
    high, low = ToyVideoNet(cond_channels=cy, seed=14), ToyVideoNet(cond_channels=cy, seed=15)
    negative = torch.linspace(-1, 1, B, dtype=f64)
    net = TimeSwitchedNet(classifier_free_guidance(high, 4.0, negative), classifier_free_guidance(low, 3.0, negative),
                          BOUNDARY)
    x = draws(8)[0]
    y = torch.randn(B, cy, 3, 2, 3, dtype=f64)
    context = torch.ones(B, dtype=f64)
    timestep = torch.tensor([990.0, 100.0, 880.0], dtype=f64)
    v = network_velocity(net, x, timestep, context, inputs={"y": y})
    for i, (expert, w) in enumerate([(high, 4.0), (low, 3.0), (high, 4.0)]):
        rows = slice(i, i + 1)
        v_c = expert(x[rows], timestep[rows], context[rows], y=y[rows])
        v_u = expert(x[rows], timestep[rows], negative[rows], y=y[rows])
        torch.testing.assert_close(v[rows], v_u + w * (v_c - v_u), rtol=1e-13, atol=1e-14)


def test_expert_boundary_loss_ties_the_high_student_to_the_low_one_at_the_boundary():
    from rcm.losses import expert_boundary_loss

    high, low = ToyVideoNet(seed=16), ToyVideoNet(seed=17)
    student = TimeSwitchedNet(high, low, BOUNDARY)
    x0, noise, _ = draws(9)
    condition = frame_condition(4)
    loss, diag = expert_boundary_loss(student, x0, None, loss_scale=2.0, noise=noise, condition=condition)
    # by hand: x_b at t_b = arctan(ρ_b/(1 − ρ_b)), f = x̂0 of each expert, mean over generated positions
    t_b = torch.full((B,), math.atan(BOUNDARY / (1 - BOUNDARY)), dtype=f64)
    x_b = condition.impose(math.cos(t_b[0]) * x0 + math.sin(t_b[0]) * noise)
    d = trigflow_denoise(high, x_b, t_b, None, condition=condition).x0 - trigflow_denoise(low, x_b, t_b, None,
                                                                                          condition=condition).x0
    keep = ~MASK.expand_as(d)
    expected = torch.stack([2.0 * d[b][keep[b]].pow(2).mean() for b in range(B)])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert bool((diag["gap"] > 0).all())
    loss.sum().backward()
    assert all(p.grad is None for p in low.parameters())  # the low student is the target
    assert high.frame_bias.grad.abs().sum() > 0
    # equal experts: zero loss
    same, _ = expert_boundary_loss(TimeSwitchedNet(low, low, BOUNDARY), x0, None, noise=noise, condition=condition)
    assert bool((same == 0).all())
    with pytest.raises(ValueError, match="student must be a TimeSwitchedNet"):
        expert_boundary_loss(high, x0, None, noise=noise)
