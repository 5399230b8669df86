"""Image-to-video conditioning through the denoiser, losses and rollout (docs/method.md §12):
frame replacement (Wan2.2 TI2V style: given frames clean, per-frame timestep map) and channel
concatenation (Wan2.1 I2V style: ``y`` / ``image_context`` network inputs), fp64 on CPU. The samplers:
``test_conditioning_samplers.py``."""

import pytest
import torch
from torch import nn

from rcm.losses import (
    DMDConfig,
    RCMConfig,
    SCMConfig,
    backward_simulation,
    critic_loss,
    dmd_loss,
    fake_score_loss,
    scm_jvp,
    scm_loss,
    student_losses,
)
from rcm.models.trigflow import (
    FrameCondition,
    FunctionalNet,
    classifier_free_guidance,
    trigflow_denoise,
)
from rcm.models.wan import WanDiT, wan_config

f64 = torch.float64
B, C, T, H, W = 3, 2, 3, 2, 3
# sample 0: frame 0 given; sample 1: frames 0 and 1; sample 2: none (a text-to-video sample in the batch)
MASK = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool).view(B, 1, T, 1, 1)


class ToyVideoNet(nn.Module):
    """A small conv velocity net with the conditioned interface ``net(x, timestep, context, *, y=None,
    image_context=None)``: ``timestep`` [B] or a per-frame map [B, 1, T, 1, 1]; a temporal conv mixes
    frames (the given frames feed the generated ones); ``frame_bias`` [T] is added to v on each frame, a
    parameter that only that frame's output sees; ``y`` channels are concatenated to x."""

    def __init__(self, channels=C, cond_channels=0, image_dim=0, hidden=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cond_channels, self.image_dim = cond_channels, image_dim
        self.inp = nn.Conv3d(channels + cond_channels + 2, hidden, (3, 3, 1), padding=(1, 1, 0), dtype=f64)
        self.out = nn.Conv3d(hidden, channels, (3, 1, 3), padding=(1, 0, 1), dtype=f64)
        self.frame_bias = nn.Parameter(torch.zeros(T, dtype=f64))
        self.image_proj = nn.Parameter(torch.zeros(max(image_dim, 1), dtype=f64))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=f64) * 0.4)

    def forward(self, x, timestep, context, *, y=None, image_context=None):
        b, _, t, h, w = x.shape
        if timestep.ndim == 1:
            timestep = timestep.view(b, 1, 1, 1, 1)
        assert timestep.shape in ((b, 1, 1, 1, 1), (b, 1, t, 1, 1)), timestep.shape
        tau = (timestep / 1000).expand(b, 1, t, h, w).to(x.dtype)
        parts = [x, torch.sin(3 * tau), tau ** 2]
        if self.cond_channels:
            if y is None:
                raise ValueError("ToyVideoNet: y is required")
            parts.insert(1, y.to(x.dtype))
        v = self.out(torch.tanh(self.inp(torch.cat(parts, 1)))) + self.frame_bias.view(1, 1, t, 1, 1)
        if self.image_dim:
            v = v + (image_context @ self.image_proj).mean(1).view(b, 1, 1, 1, 1)
        return v if context is None else v + context.view(b, 1, 1, 1, 1).to(v.dtype)


class Recorder:
    """Wraps a network and keeps, for every call outside a JVP, its x, timestep and input names."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, timestep, context, **inputs):
        if not torch._C._functorch.is_functorch_wrapped_tensor(x):
            self.calls.append((x.detach().clone(), timestep.detach().clone(), sorted(inputs)))
        return self.net(x, timestep, context, **inputs)


def draws(seed=0, shape=(B, C, T, H, W)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=f64) for _ in range(3)]


def frame_condition(seed=0, mask=MASK):
    latent, _, _ = draws(seed + 100)
    return FrameCondition(latent=latent, mask=mask)


def given(x, mask=MASK):
    """The values of x on the given frames (flattened)."""
    return x[mask.expand_as(x)]


def generated(x, mask=MASK):
    return x[~mask.expand_as(x)]


# ------------------------------------------------------------------------------------------------
# FrameCondition and the denoiser


def test_frame_condition_rejects_bad_arguments():
    x = torch.zeros(B, C, T, H, W, dtype=f64)
    latent = torch.zeros_like(x)
    bad = {
        "mask alone": (FrameCondition(mask=MASK), "latent and mask go together"),
        "mask shape": (FrameCondition(latent, MASK.view(B, T, 1, 1, 1)), r"mask must be \[B or 1, 1, T"),
        "mask values": (FrameCondition(latent, MASK.to(f64) * 2), "only 0 and 1"),
        "latent shape": (FrameCondition(latent[:, :1], MASK), "latent must be a floating tensor"),
        "input batch": (FrameCondition(inputs={"y": torch.zeros(2, 1)}), r"inputs\['y'\] must be a tensor with batch"),
    }
    for condition, match in bad.values():
        with pytest.raises(ValueError, match=match):
            condition.checked(x)
    with pytest.raises(ValueError, match=r"states \[B, C, T, H, W\]"):
        FrameCondition(latent, MASK).checked(x[:, :, :, 0])
    ok = FrameCondition(latent[:1], MASK[:1].to(f64), {"y": torch.ones(1, 4)}).checked(x)
    assert ok.mask.dtype == torch.bool and ok.inputs["y"].shape == (B, 4)


def test_denoiser_frame_replacement_is_exact_on_given_frames():
    """x̂0 = latent and F = 0 on the given frames whatever x_t holds there; the network sees the clean
    latent there with timestep 0, and 1000ρ elsewhere; generated frames equal a plain per-position
    TrigFlow denoiser of the same network."""
    net = Recorder(ToyVideoNet())
    x_t, _, _ = draws(1)
    condition = frame_condition()
    t = torch.tensor([0.3, 1.2, 1.5], dtype=f64)
    out = trigflow_denoise(net, x_t, t, None, condition=condition)
    assert torch.equal(given(out.x0), given(condition.latent)) and bool((given(out.F) == 0).all())
    (x_in, timestep, _), = net.calls
    assert timestep.shape == (B, 1, T, 1, 1)
    rho = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    expected_timestep = torch.where(MASK, 0.0, 1000 * rho.view(B, 1, 1, 1, 1))
    torch.testing.assert_close(timestep, expected_timestep, rtol=1e-15, atol=0)
    assert torch.equal(given(x_in), given(condition.latent))  # c_in = 1 at time 0
    # generated positions: x̂0 = (x_t − s v)/(c + s) with the network's v on the conditioned input
    c, s = torch.cos(t).view(B, 1, 1, 1, 1), torch.sin(t).view(B, 1, 1, 1, 1)
    x_in_expected = torch.where(MASK, condition.latent, x_t / (c + s))
    torch.testing.assert_close(x_in, x_in_expected, rtol=1e-15, atol=0)
    v = ToyVideoNet()(x_in_expected, expected_timestep, None)
    torch.testing.assert_close(generated(out.x0), generated((x_t - s * v) / (c + s)), rtol=1e-12, atol=1e-12)
    # without the condition the given frames are just noisy states
    plain = trigflow_denoise(ToyVideoNet(), x_t, t, None)
    assert not torch.allclose(given(plain.x0), given(condition.latent))


def test_empty_condition_is_bitwise_text_to_video():
    """FrameCondition() changes nothing: denoiser, sCM, DMD and critic losses equal condition=None."""
    student, teacher, fake = ToyVideoNet(seed=0), ToyVideoNet(seed=1), ToyVideoNet(seed=2)
    x0, noise, _ = draws(2)
    t = torch.tensor([0.2, 0.9, 1.4], dtype=f64)
    ctx = torch.randn(B, dtype=f64)
    a = trigflow_denoise(student, noise, t, ctx)
    b = trigflow_denoise(student, noise, t, ctx, condition=FrameCondition())
    assert torch.equal(a.x0, b.x0) and torch.equal(a.F, b.F)
    cfg = SCMConfig(guidance=1.0, tangent_warmup=0)
    la, _ = scm_loss(student, teacher, x0, ctx, iteration=0, config=cfg, t=t, noise=noise)
    lb, _ = scm_loss(student, teacher, x0, ctx, iteration=0, config=cfg, t=t, noise=noise, condition=FrameCondition())
    assert torch.equal(la, lb)
    dcfg = DMDConfig(guidance=1.0)
    da, _ = dmd_loss(x0, teacher, fake, ctx, config=dcfg, t=t, noise=noise)
    db, _ = dmd_loss(x0, teacher, fake, ctx, config=dcfg, t=t, noise=noise, condition=FrameCondition())
    ca, _ = fake_score_loss(x0, fake, ctx, config=dcfg, t=t, noise=noise)
    cb, _ = fake_score_loss(x0, fake, ctx, config=dcfg, t=t, noise=noise, condition=FrameCondition())
    assert torch.equal(da, db) and torch.equal(ca, cb)


# ------------------------------------------------------------------------------------------------
# sCM: the JVP tangent


def _central_difference(student, x_t, t, F_teacher, condition, context=None, h=1e-6):
    cs = torch.cos(t) * torch.sin(t)
    direction = cs.view(-1, 1, 1, 1, 1) * F_teacher

    def F(eps):
        return trigflow_denoise(student, x_t + eps * direction, t + eps * cs, context, condition=condition).F

    return (F(h) - F(-h)) / (2 * h)


@pytest.mark.parametrize("with_inputs", [False, True])
def test_scm_jvp_frame_replacement_matches_finite_differences_and_is_zero_on_given_frames(with_inputs):
    """Frame replacement alone (TI2V), and with conditioning channels as well."""
    cy = 2 if with_inputs else 0
    student, teacher = ToyVideoNet(cond_channels=cy, seed=3), ToyVideoNet(cond_channels=cy, seed=4)
    y = torch.randn(B, cy, T, H, W, dtype=f64, generator=torch.Generator().manual_seed(9))
    condition = FrameCondition(*frame_condition(1)[:2], {"y": y} if with_inputs else None)
    x0, noise, _ = draws(3)
    t = torch.tensor([0.4, 1.1, 1.45], dtype=f64)
    x_t = condition.impose(torch.cos(t).view(B, 1, 1, 1, 1) * x0 + torch.sin(t).view(B, 1, 1, 1, 1) * noise)
    F_teacher = trigflow_denoise(teacher, x_t, t, None, condition=condition).F
    assert bool((given(F_teacher) == 0).all())
    tangent = scm_jvp(student, x_t, t, None, F_teacher, condition=condition)
    assert bool((given(tangent) == 0).all())  # exactly: the given frames do not move
    assert generated(tangent).abs().min() > 0
    fd = _central_difference(student, x_t, t, F_teacher, condition)
    torch.testing.assert_close(tangent, fd, rtol=1e-7, atol=1e-8)
    # a caller's x_t / F_teacher with values on the given frames change nothing: the denoiser drops them
    junk = torch.where(MASK, 5.0, 0.0)
    torch.testing.assert_close(scm_jvp(student, x_t + junk, t, None, F_teacher + junk, condition=condition),
                               tangent, rtol=1e-14, atol=0)
    # a JVP that ignored the condition (noisy given frames, one timestep) is a different function
    unconditioned = scm_jvp(student, x_t, t, None, F_teacher, condition=FrameCondition(inputs=condition.inputs))
    assert (generated(unconditioned) - generated(tangent)).abs().max() > 1e-3


class ConcatWan(nn.Module):
    """A tiny random WanDiT taking the conditioning channels ``y`` concatenated to x (Wan2.1 I2V's input)."""

    def __init__(self, cond_channels=5, seed=0):
        super().__init__()
        cfg = wan_config("wan-tiny")
        self.dit = WanDiT(type(cfg)(**{**cfg.__dict__, "in_dim": cfg.out_dim + cond_channels, "num_layers": 1}))
        g = torch.Generator().manual_seed(seed)
        self.dit.init_weights(generator=g)
        with torch.no_grad():
            self.dit.head.head.weight.normal_(0, 0.05, generator=g)
        self.dit.to(f64)

    def forward(self, x, timestep, context, *, y):
        return self.dit(torch.cat([x, y.to(x.dtype)], 1), timestep, context)


@pytest.mark.parametrize("kind", ["toy", "wan"])
def test_scm_jvp_channel_concatenation_matches_finite_differences_with_no_tangent_into_inputs(kind):
    """The conditioning channels are constants of the JVP: the tangent equals central differences with y
    fixed, equals a JVP that carries y as a primal with a zero tangent, and differs from one with a
    non-zero tangent on y (so the check can fail)."""
    g = torch.Generator().manual_seed(5)
    if kind == "toy":
        shape, cy = (B, C, T, H, W), 3
        student = ToyVideoNet(cond_channels=cy, image_dim=4, seed=5)
        context = None
        inputs = {"y": torch.randn(B, cy, T, H, W, generator=g, dtype=f64),
                  "image_context": torch.randn(B, 2, 4, generator=g, dtype=f64)}
    else:
        shape, cy = (2, 4, 2, 4, 2), 5
        student = ConcatWan(cy, seed=5)
        context = torch.randn(2, 8, 32, generator=g, dtype=f64)
        inputs = {"y": torch.randn(2, cy, 2, 4, 2, generator=g, dtype=f64)}
    condition = FrameCondition(inputs=inputs)
    x_t = torch.randn(shape, generator=g, dtype=f64)
    F_teacher = torch.randn(shape, generator=g, dtype=f64)
    t = torch.linspace(0.3, 1.4, shape[0], dtype=f64)
    tangent = scm_jvp(student, x_t, t, context, F_teacher, condition=condition)
    fd = _central_difference(student, x_t, t, F_teacher, condition, context)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-8)

    cs = torch.cos(t) * torch.sin(t)

    def F(x, time, y):
        cond = FrameCondition(inputs={**inputs, "y": y})
        return trigflow_denoise(student, x, time, context, condition=cond).F

    with torch.no_grad():
        primals = (x_t, t, inputs["y"])
        zero_y = torch.func.jvp(F, primals, (cs.view(-1, 1, 1, 1, 1) * F_teacher, cs, torch.zeros_like(inputs["y"])))[1]
        some_y = torch.func.jvp(F, primals, (cs.view(-1, 1, 1, 1, 1) * F_teacher, cs, torch.ones_like(inputs["y"])))[1]
    torch.testing.assert_close(tangent, zero_y, rtol=1e-13, atol=1e-13)
    assert (some_y - tangent).abs().max() > 1e-4


def test_scm_loss_frame_replacement_excludes_given_frames():
    """The given frames carry no learning signal: the loss ignores the noise there, the gradient into a
    parameter seen only by a given frame's output is 0, and the latent still steers the generated frames."""
    teacher = ToyVideoNet(seed=7)
    student = ToyVideoNet(seed=8)
    params = dict(student.named_parameters())
    condition = frame_condition(2, mask=MASK[:1].expand(B, 1, T, 1, 1))  # frame 0 given in every sample
    x0, noise, other = draws(4)
    t = torch.tensor([0.3, 0.9, 1.5], dtype=f64)
    cfg = SCMConfig(guidance=1.0, tangent_warmup=0)

    def loss_of(noise, condition=condition, params=params):
        loss, _ = scm_loss(FunctionalNet(student, params), teacher, x0, None, iteration=0, config=cfg,
                           t=t, noise=noise, condition=condition)
        return loss

    loss = loss_of(noise)
    frame0 = condition.mask.expand_as(noise)
    assert torch.equal(loss, loss_of(torch.where(frame0, other, noise)))  # noise on the given frames unused
    loss.sum().backward()
    grad = params["frame_bias"].grad
    assert grad[0] == 0 and bool((grad[1:].abs() > 0).all())
    # ‖g‖ is over the generated frames: g = −c √(1 − s²) (F_θ⁻ − F_tea) − c s x_t − c s dF/dt (r = 1), 0 on frame 0
    _, diag = scm_loss(FunctionalNet(student, params), teacher, x0, None, iteration=0, config=cfg, t=t,
                       noise=noise, condition=condition)
    c, s = torch.cos(t).view(B, 1, 1, 1, 1), torch.sin(t).view(B, 1, 1, 1, 1)
    x_t = condition.impose(c * x0 + s * noise)
    F_tea = trigflow_denoise(teacher, x_t, t, None, condition=condition).F
    F_minus = trigflow_denoise(student, x_t, t, None, condition=condition).F
    g = -c * torch.sqrt(1 - s ** 2) * (F_minus - F_tea) - c * s * x_t - scm_jvp(student, x_t, t, None, F_tea, condition=condition)
    g_generated = torch.where(frame0, 0.0, g)
    torch.testing.assert_close(diag["g_norm"], g_generated.flatten(1).norm(dim=1), rtol=1e-12, atol=0)
    assert (g.flatten(1).norm(dim=1) - diag["g_norm"]).abs().min() > 1e-3  # frame 0 of g would count
    moved = FrameCondition(condition.latent + 1, condition.mask)
    assert not torch.allclose(loss_of(noise, moved), loss)
    # the same loss without the condition trains frame 0 too (so the check above can fail)
    params_plain = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    loss_of(noise, None, params_plain).sum().backward()
    assert params_plain["frame_bias"].grad[0] != 0


# ------------------------------------------------------------------------------------------------
# DMD: rollout, DMD loss, critic


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rollout_keeps_the_given_frames_exact(steps):
    student = Recorder(ToyVideoNet(seed=9))
    latent = draws(5)[0].to(torch.float32).to(f64)  # fp32-representable, G is fp32
    condition = FrameCondition(latent, MASK)
    noise = draws(6)[0]
    G = backward_simulation(student, None, noise, steps, config=DMDConfig(), condition=condition,
                            generator=torch.Generator().manual_seed(0))
    assert G.dtype == torch.float32 and torch.equal(given(G).to(f64), given(latent))
    assert len(student.calls) == steps
    for x_in, timestep, _ in student.calls:  # every state the student sees: given frames clean, at time 0
        assert torch.equal(given(x_in), given(latent)) and bool((given(timestep.expand(B, 1, T, 1, 1)) == 0).all())
        assert bool((generated(timestep.expand(B, 1, T, 1, 1)) > 0).all())


def test_rollout_gradient_only_on_generated_frames():
    net = ToyVideoNet(seed=10)
    condition = frame_condition(3)
    G = backward_simulation(net, None, draws(7)[0], 2, config=DMDConfig(), condition=condition,
                            generator=torch.Generator().manual_seed(1), with_grad=True)
    G.sum().backward()
    grad = net.frame_bias.grad
    assert grad[2] != 0  # frame 2 is generated in every sample
    # frame 0 is given in samples 0 and 1, generated in sample 2: its gradient is sample 2's alone
    net2 = ToyVideoNet(seed=10)
    G2 = backward_simulation(net2, None, draws(7)[0], 2, config=DMDConfig(), condition=condition,
                             generator=torch.Generator().manual_seed(1), with_grad=True)
    G2[2, :, 0].sum().backward()
    assert torch.equal(grad[0], net2.frame_bias.grad[0])


def test_dmd_loss_excludes_given_frames_and_averages_omega_over_generated_ones():
    teacher, fake = ToyVideoNet(seed=11), ToyVideoNet(seed=12)
    condition = frame_condition(4)
    G0, noise, junk = draws(8)
    G = condition.impose(G0).requires_grad_()
    t = torch.tensor([0.5, 1.0, 1.5], dtype=f64)
    cfg = DMDConfig(guidance=1.0)
    loss, diag = dmd_loss(G, teacher, fake, None, config=cfg, t=t, noise=noise, condition=condition)
    loss.sum().backward()
    assert bool((given(G.grad) == 0).all()) and generated(G.grad).abs().min() > 0
    # ω: mean |G − x̂0_real| over the generated positions only
    x_D = condition.impose(torch.cos(t).view(B, 1, 1, 1, 1) * G0 + torch.sin(t).view(B, 1, 1, 1, 1) * noise)
    x0_real = trigflow_denoise(teacher, x_D, t, None, condition=condition).x0
    err = (condition.impose(G0) - x0_real).abs()
    for b in range(B):
        torch.testing.assert_close(diag["omega"][b], err[b][~MASK[b].expand_as(err[b])].mean(), rtol=1e-13, atol=0)
    # G's values on the given frames do not matter
    loss2, _ = dmd_loss(torch.where(MASK, junk, G0), teacher, fake, None, config=cfg, t=t, noise=noise,
                        condition=condition)
    assert torch.equal(loss.detach(), loss2)


def test_critic_loss_excludes_given_frames():
    fake = ToyVideoNet(seed=13)
    condition = frame_condition(5)
    G, noise, junk = draws(9)
    G = condition.impose(G)
    t = torch.tensor([0.2, 0.8, 1.3], dtype=f64)
    cfg = DMDConfig()
    loss, _ = fake_score_loss(G, fake, None, config=cfg, t=t, noise=noise, condition=condition)
    # = Σ over generated positions of (G − x̂0_fake)²/sin²t
    x_D = condition.impose(torch.cos(t).view(B, 1, 1, 1, 1) * G + torch.sin(t).view(B, 1, 1, 1, 1) * noise)
    x0_fake = trigflow_denoise(fake, x_D, t, None, condition=condition).x0
    sq = (G - x0_fake) ** 2
    expected = torch.stack([sq[b][~MASK[b].expand_as(sq[b])].sum() for b in range(B)]) / torch.sin(t) ** 2
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    loss.sum().backward()
    grad = fake.frame_bias.grad
    # frame 1 is given in sample 1 only; only samples 0 and 2 train it
    fake2 = ToyVideoNet(seed=13)
    loss_b, _ = fake_score_loss(G, fake2, None, config=cfg, t=t, noise=noise, condition=condition)
    loss_b[[0, 2]].sum().backward()
    torch.testing.assert_close(grad[1], fake2.frame_bias.grad[1], rtol=1e-13, atol=0)
    loss2, _ = fake_score_loss(torch.where(MASK, junk, G), fake, None, config=cfg, t=t, noise=noise,
                               condition=condition)
    assert torch.equal(loss.detach(), loss2)
    unmasked, _ = fake_score_loss(torch.where(MASK, junk, G), fake, None, config=cfg, t=t, noise=noise)
    assert not torch.allclose(unmasked, loss.detach())


def test_rcm_objectives_pass_the_condition_everywhere():
    """student_losses and critic_loss give every network the conditioning inputs (a network that needs
    ``y`` fails without it) and keep the given frames of their rollouts."""
    cy = 2
    student, teacher, fake = (ToyVideoNet(cond_channels=cy, seed=s) for s in (14, 15, 16))
    y = torch.randn(B, cy, T, H, W, dtype=f64, generator=torch.Generator().manual_seed(3))
    condition = FrameCondition(frame_condition(6).latent, MASK, {"y": y})
    x0 = condition.impose(draws(10)[0])
    config = RCMConfig(scm=SCMConfig(guidance=1.0, tangent_warmup=0), dmd=DMDConfig(guidance=1.0),
                       student_update_freq=2)
    names = [name for name, loss, _ in student_losses(student, teacher, fake, x0, None, iteration=0, config=config,
                                                      generator=torch.Generator().manual_seed(0), condition=condition)
             if bool(torch.isfinite(loss).all())]
    assert names == ["scm", "dmd"]
    loss, _ = critic_loss(student, fake, x0, None, iteration=1, config=config,
                          generator=torch.Generator().manual_seed(0), condition=condition)
    assert bool(torch.isfinite(loss).all())
    with pytest.raises(ValueError, match="y is required"):
        list(student_losses(student, teacher, fake, x0, None, iteration=0, config=config,
                            generator=torch.Generator().manual_seed(0)))


def test_guidance_keeps_the_image_inputs_in_both_passes():
    net = Recorder(ToyVideoNet(cond_channels=1, seed=17))
    y = torch.randn(B, 1, T, H, W, dtype=f64)
    guided = classifier_free_guidance(net, 3.0, torch.zeros(B, dtype=f64))
    trigflow_denoise(guided, draws(11)[0], torch.full((B,), 0.7, dtype=f64), torch.ones(B, dtype=f64),
                     condition=FrameCondition(inputs={"y": y}))
    assert [names for _, _, names in net.calls] == [["y"], ["y"]]


def test_every_state_the_losses_make_keeps_the_given_frames_clean(monkeypatch):
    """The states the losses hand to the denoiser (x_t of sCM, every rollout state, the x^D of DMD and of
    the critic) hold the clean latent on the given frames before any network is called."""
    import rcm.losses.dmd as dmd_module
    import rcm.losses.scm as scm_module

    states = []

    def recording_denoise(net, x_t, t, context, **kwargs):
        if not torch._C._functorch.is_functorch_wrapped_tensor(x_t):
            states.append(x_t.detach().clone())
        return trigflow_denoise(net, x_t, t, context, **kwargs)

    monkeypatch.setattr(scm_module, "trigflow_denoise", recording_denoise)
    monkeypatch.setattr(dmd_module, "trigflow_denoise", recording_denoise)
    condition = frame_condition(10)
    student, teacher, fake = ToyVideoNet(seed=20), ToyVideoNet(seed=21), ToyVideoNet(seed=22)
    x0 = draws(16)[0]  # its given frames differ from the latent: the losses must replace them
    g = torch.Generator().manual_seed(0)
    scm_loss(student, teacher, x0, None, iteration=0, config=SCMConfig(guidance=1.0), generator=g, condition=condition)
    assert len(states) == 2  # teacher and the student's grad forward (the JVP's state is a dual tensor)
    G = backward_simulation(student, None, draws(17)[0], 4, generator=g, condition=condition)
    dmd_loss(G, teacher, fake, None, config=DMDConfig(guidance=1.0), generator=g, condition=condition)
    fake_score_loss(G, fake, None, generator=g, condition=condition)
    assert len(states) == 2 + 4 + 2 + 1
    for x_t in states:
        assert torch.equal(given(x_t), given(condition.latent))
