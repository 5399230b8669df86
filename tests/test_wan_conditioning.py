"""Image-to-video conditioning and two experts through REAL tiny Wan DiTs (fp64, CPU; docs/method.md §12):
the per-frame timestep map the losses pass, the sCM tangent against central differences, the DMD rollout's
given frame, the expert dispatch inside the rCM objectives, and a few optimizer steps of rCM per variant."""
import copy

import pytest
import torch

from rcm.losses import (
    DMDConfig,
    RCMConfig,
    SCMConfig,
    backward_simulation,
    critic_loss,
    rcm_phase,
    scm_jvp,
    student_losses,
)
from rcm.models import WanDiT, WanExperts, wan_config
from rcm.models.trigflow import FrameCondition, TimeSwitchedNet, trigflow_denoise
from rcm.models.wan import per_token_timestep
from tests.test_conditioning import _central_difference

f64 = torch.float64
B, T, H, W = 3, 3, 4, 2  # latent frames 3, patch grid (3, 2, 1): 6 tokens
MASK = torch.tensor([True, False, False]).view(1, 1, T, 1, 1).expand(B, 1, T, 1, 1)
MASK_MIXED = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool).view(B, 1, T, 1, 1)  # last: T2V
BOUNDARY = 0.875


def tiny_dit(name, seed, **overrides):
    """A one-block tiny random DiT in fp64 with a non-zero head (Wan's init zeroes it)."""
    dit = WanDiT(wan_config(name, num_layers=1, **overrides))
    g = torch.Generator().manual_seed(seed)
    dit.init_weights(generator=g)
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05, generator=g)
    return dit.to(f64)


def randn(*shape, seed):
    return torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(seed))


def text(seed, batch=B):
    return randn(batch, 8, 32, seed=seed)


def ti2v_condition(seed, mask=MASK):
    return FrameCondition(randn(B, 8, T, H, W, seed=seed), mask)


def i2v_inputs(seed, batch=B):
    cfg = wan_config("wan-tiny-i2v")
    return {"y": randn(batch, cfg.cond_dim, T, H, W, seed=seed),
            "image_context": randn(batch, cfg.image_len, cfg.image_dim, seed=seed + 1)}


def given(x, mask=MASK):
    return x[mask.expand_as(x)]


def generated(x, mask=MASK):
    return x[~mask.expand_as(x)]


def noisy(condition, t, seed, channels):
    x0, noise = randn(B, channels, T, H, W, seed=seed), randn(B, channels, T, H, W, seed=seed + 1)
    x_t = torch.cos(t).view(B, 1, 1, 1, 1) * x0 + torch.sin(t).view(B, 1, 1, 1, 1) * noise
    return condition.impose(x_t) if condition.mask is not None else x_t


# ------------------------------------------------------------------------------------------------
# the per-frame timestep map


def test_wan_dit_takes_the_per_frame_map_as_per_token_timesteps():
    dit = tiny_dit("wan-tiny-ti2v", 0)
    x = randn(B, 8, T, H, W, seed=1)
    frame_times = torch.tensor([[0.0, 700.0, 700.0], [0.0, 30.0, 30.0], [500.0, 500.0, 500.0]], dtype=f64)
    frame_map = frame_times.view(B, 1, T, 1, 1)
    per_token = frame_times.repeat_interleave(2 * 1, dim=1)  # (t, h, w) order: each frame's 2 tokens together
    assert torch.equal(per_token_timestep(frame_map, (3, 2, 1), (1, 2, 2)), per_token)
    ctx = text(2)
    torch.testing.assert_close(dit(x, frame_map, ctx), dit(x, per_token, ctx), rtol=0, atol=0)
    # a uniform map is the plain [B] timestep
    torch.testing.assert_close(dit(x[2:], frame_map[2:], ctx[2:]), dit(x[2:], torch.tensor([500.0], dtype=f64), ctx[2:]),
                               rtol=1e-13, atol=1e-13)
    # a temporal patch takes each patch's first frame
    assert per_token_timestep(torch.arange(4.0).view(1, 1, 4, 1, 1), (2, 1, 1), (2, 1, 1)).tolist() == [[0.0, 2.0]]
    with pytest.raises(ValueError, match=r"\[B, 1, T, 1, 1\]"):
        dit(x, frame_map[:, :, :2], ctx)
    with pytest.raises(ValueError, match=r"\[B, 1, T, 1, 1\]"):
        dit(x, frame_map.expand(B, 1, T, H, W), ctx)


def test_wan_experts_dispatch_the_per_frame_map_by_each_samples_largest_time():
    high, low = tiny_dit("wan-tiny-ti2v", 3), tiny_dit("wan-tiny-ti2v", 4)
    experts = WanExperts(high, low, BOUNDARY)
    x = randn(B, 8, T, H, W, seed=5)
    frame_map = torch.where(MASK, 0.0, torch.tensor([950.0, 500.0, 880.0], dtype=f64).view(B, 1, 1, 1, 1))
    assert experts.uses_high_noise(frame_map).tolist() == [True, False, True]
    ctx = text(6)
    out = experts(x, frame_map, ctx)
    for i, expert in enumerate([high, low, high]):
        torch.testing.assert_close(out[i:i + 1], expert(x[i:i + 1], frame_map[i:i + 1], ctx[i:i + 1]),
                                   rtol=1e-13, atol=1e-13)
    # the one rule: WanExperts' is TimeSwitchedNet's
    assert torch.equal(experts.uses_high_noise(frame_map), TimeSwitchedNet(high, low, BOUNDARY).uses_high(frame_map))
    with pytest.raises(ValueError, match=r"timestep must be a tensor \[B\], \[B, L\] or \[B, 1, T, 1, 1\]"):
        experts(x, frame_map[..., 0], ctx)


# ------------------------------------------------------------------------------------------------
# sCM tangent and DMD rollout through tiny DiTs


def test_scm_tangent_through_a_ti2v_dit_matches_finite_differences_and_is_zero_on_the_given_frame():
    student, teacher = tiny_dit("wan-tiny-ti2v", 7), tiny_dit("wan-tiny-ti2v", 8)
    ctx = text(9)
    condition = ti2v_condition(10, MASK_MIXED)
    t = torch.tensor([0.5, 1.2, 1.45], dtype=f64)
    x_t = noisy(condition, t, 11, 8)
    F_teacher = trigflow_denoise(teacher, x_t, t, ctx, condition=condition).F
    assert bool((given(F_teacher, MASK_MIXED) == 0).all())
    tangent = scm_jvp(student, x_t, t, ctx, F_teacher, condition=condition)
    assert bool((given(tangent, MASK_MIXED) == 0).all())  # exactly
    assert generated(tangent, MASK_MIXED).abs().max() > 1e-3
    fd = _central_difference(student, x_t, t, F_teacher, condition, ctx)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)
    # ignoring the condition (the given frame noisy, one timestep) is a different function
    plain = scm_jvp(student, x_t, t, ctx, F_teacher)
    assert (generated(plain, MASK_MIXED) - generated(tangent, MASK_MIXED)).abs().max() > 1e-4


def test_scm_tangent_through_an_i2v_14b_dit_matches_finite_differences_with_no_tangent_into_the_image():
    student = tiny_dit("wan-tiny-i2v", 12)
    ctx, inputs = text(13), i2v_inputs(14)
    condition = FrameCondition(inputs=inputs)
    t = torch.tensor([0.3, 0.9, 1.4], dtype=f64)
    x_t = noisy(condition, t, 15, 4)
    F_teacher = randn(B, 4, T, H, W, seed=17)
    tangent = scm_jvp(student, x_t, t, ctx, F_teacher, condition=condition)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, _central_difference(student, x_t, t, F_teacher, condition, ctx),
                               rtol=1e-6, atol=1e-8)
    cs = torch.cos(t) * torch.sin(t)

    def F(x, time, y, image_context):
        cond = FrameCondition(inputs={"y": y, "image_context": image_context})
        return trigflow_denoise(student, x, time, ctx, condition=cond).F

    primals = (x_t, t, inputs["y"], inputs["image_context"])
    state = (cs.view(-1, 1, 1, 1, 1) * F_teacher, cs)
    with torch.no_grad():
        zero = torch.func.jvp(F, primals, (*state, torch.zeros_like(inputs["y"]),
                                           torch.zeros_like(inputs["image_context"])))[1]
        # (a random direction: LayerNorm first in img_emb removes a constant one)
        into_image = torch.func.jvp(F, primals, (*state, torch.zeros_like(inputs["y"]),
                                                 randn(*inputs["image_context"].shape, seed=16)))[1]
    torch.testing.assert_close(tangent, zero, rtol=1e-13, atol=1e-13)
    assert (into_image - tangent).abs().max() > 1e-5


@pytest.mark.parametrize("steps", [1, 3])
def test_dmd_rollout_through_a_ti2v_dit_keeps_the_given_frame_exact(steps):
    student = tiny_dit("wan-tiny-ti2v", 18)
    condition = ti2v_condition(19)
    G = backward_simulation(student, text(20), randn(B, 8, T, H, W, seed=21), steps, condition=condition,
                            generator=torch.Generator().manual_seed(0), with_grad=True)
    assert torch.equal(given(G), given(condition.latent).to(G.dtype))
    assert bool(torch.isfinite(G).all()) and generated(G).abs().max() > 0
    # the DMD gradient reaches the student through the generated frames only
    G.pow(2).mean().backward()
    assert student.head.head.weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------------
# two experts inside the rCM objectives


class RecordingExperts:
    """Forward pre-hooks on a WanExperts' two DiTs: every call's per-sample largest timestep."""

    def __init__(self, experts):
        self.seen = {"high": [], "low": []}
        for name, dit in (("high", experts.high_noise), ("low", experts.low_noise)):
            dit.register_forward_pre_hook(self._hook(name))

    def _hook(self, name):
        def record(module, args):
            timestep = args[1]
            self.seen[name].extend(timestep.flatten(1).amax(1).tolist() if timestep.ndim > 1 else timestep.tolist())
        return record


def experts_of(name, seed):
    return WanExperts(tiny_dit(name, seed), tiny_dit(name, seed + 1), BOUNDARY)


def test_two_expert_teacher_student_and_critic_send_each_sample_to_its_expert():
    teacher, student, fake = experts_of("wan-tiny-i2v-experts", 22), experts_of("wan-tiny-i2v-experts", 22), \
        experts_of("wan-tiny-i2v-experts", 22)
    records = [RecordingExperts(net) for net in (teacher, student, fake)]
    x0 = randn(B, 4, T, H, W, seed=24)
    condition = FrameCondition(inputs={"y": randn(B, 8, T, H, W, seed=25)})
    config = RCMConfig(scm=SCMConfig(guidance=1.0, tangent_warmup=0), dmd=DMDConfig(guidance=1.0),
                       student_update_freq=2)
    gen = torch.Generator().manual_seed(3)
    for _, loss, _ in student_losses(student, teacher, fake, x0, text(26), iteration=0, config=config,
                                     generator=gen, condition=condition):
        assert bool(torch.isfinite(loss).all())
    loss, _ = critic_loss(student, fake, x0, text(26), iteration=1, config=config, generator=gen,
                          condition=condition)
    assert bool(torch.isfinite(loss).all())
    for record in records:
        assert all(time >= 1000 * BOUNDARY for time in record.seen["high"])
        assert all(time < 1000 * BOUNDARY for time in record.seen["low"])
    # each network used both of its experts (the rollout starts at ρ = 1 and the draws straddle the boundary)
    for role, record in zip(("teacher", "student", "fake"), records):
        assert record.seen["high"] and record.seen["low"], (role, record.seen)


# ------------------------------------------------------------------------------------------------
# a few optimizer steps of rCM per tiny variant


def variant(kind):
    """(teacher, x0, context, condition) of a tiny TI2V / I2V-14B / two-expert I2V-A14B setting."""
    if kind == "ti2v":
        return tiny_dit("wan-tiny-ti2v", 30), randn(B, 8, T, H, W, seed=31), ti2v_condition(32)
    if kind == "i2v":
        return tiny_dit("wan-tiny-i2v", 33), randn(B, 4, T, H, W, seed=34), FrameCondition(inputs=i2v_inputs(35))
    return experts_of("wan-tiny-i2v-experts", 36), randn(B, 4, T, H, W, seed=38), \
        FrameCondition(inputs={"y": randn(B, 8, T, H, W, seed=39)})


@pytest.mark.parametrize("kind", ["ti2v", "i2v", "experts"])
def test_a_few_rcm_steps_on_each_tiny_variant_stay_finite_and_move_the_student(kind):
    teacher, x0, condition = variant(kind)
    teacher.requires_grad_(False)
    student, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    start = [p.detach().clone() for p in student.parameters()]
    opt_student = torch.optim.Adam(student.parameters(), lr=1e-3)
    opt_fake = torch.optim.Adam(fake.parameters(), lr=1e-3)
    config = RCMConfig(scm=SCMConfig(guidance=1.0, tangent_warmup=0), dmd=DMDConfig(guidance=1.0),
                       student_update_freq=2)
    ctx, gen = text(40), torch.Generator().manual_seed(1)
    phases = []
    for iteration in range(4):
        phases.append(rcm_phase(iteration, config))
        if phases[-1] == "student":
            total = sum(loss.mean() for _, loss, _ in student_losses(
                student, teacher, fake, x0, ctx, iteration=iteration, config=config, generator=gen,
                condition=condition))
            opt, params = opt_student, student.parameters()
        else:
            total = critic_loss(student, fake, x0, ctx, iteration=iteration, config=config, generator=gen,
                                condition=condition)[0].mean()
            opt, params = opt_fake, fake.parameters()
        assert bool(torch.isfinite(total))
        opt.zero_grad()
        total.backward()
        opt.step()
        assert all(bool(torch.isfinite(p).all()) for p in params)
    assert phases == ["student", "critic", "student", "critic"]
    moved = max((p.detach() - p0).abs().max() for p, p0 in zip(student.parameters(), start))
    assert moved > 1e-5
    if kind == "experts":  # both student experts trained (the rollout crosses the boundary)
        for dit, first in ((student.high_noise, start[0]), (student.low_noise, start[len(start) // 2])):
            assert (next(dit.parameters()).detach() - first).abs().max() > 0


class LabelledDiT(torch.nn.Module):
    """A module around a WanDiT with its own context (as the digits' class-conditioned DiT is)."""

    def __init__(self, seed):
        super().__init__()
        self.dit = tiny_dit("wan-tiny-ti2v", seed)
        self.embed = torch.nn.Embedding(3, 8 * 32, dtype=f64)

    @property
    def config(self):
        return self.dit.config

    def forward(self, x, timestep, labels):
        return self.dit(x, timestep, self.embed(labels).view(-1, 8, 32))


def test_wan_experts_take_two_wrapped_dits_and_split_their_context_with_the_rows():
    high, low = LabelledDiT(50), LabelledDiT(51)
    experts = WanExperts(high, low, BOUNDARY)
    x, labels = randn(B, 8, T, H, W, seed=52), torch.tensor([0, 2, 1])
    frame_map = torch.where(MASK, 0.0, torch.tensor([100.0, 990.0, 300.0], dtype=f64).view(B, 1, 1, 1, 1))
    out = experts(x, frame_map, labels)
    for i, expert in enumerate([low, high, low]):
        torch.testing.assert_close(out[i:i + 1], expert(x[i:i + 1], frame_map[i:i + 1], labels[i:i + 1]),
                                   rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="two WanDiT"):
        WanExperts(high, tiny_dit("wan-tiny-ti2v", 53), BOUNDARY)
    with pytest.raises(ValueError, match="two WanDiT"):
        WanExperts(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), BOUNDARY)
