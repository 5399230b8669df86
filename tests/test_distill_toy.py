"""Acceptance: sCM distillation of a tiny Wan DiT teacher on a toy distribution, end to end on CPU.

The teacher is a one-block Wan DiT trained here by flow matching on a bimodal toy "latent" (every
element ±1 plus N(0, 0.5²) noise). The student starts as a copy of it and is sCM-distilled for a few
hundred steps through the public losses (``scm_loss`` on a ``FunctionalNet``). Then:

* the sCM loss on fixed draws goes down, i.e. the consistency defect ‖c · df/dt‖ shrinks;
* the student's 1-step samples land close to the teacher's many-step ODE samples from the same
  noise, much closer than the teacher's own 1-step samples (the posterior mean, near 0).

Time embedding: Wan embeds c_noise = 1000ρ with sinusoids of frequency up to 1 rad per unit, i.e.
~160 periods over ρ ∈ [0, 1]. A briefly trained tiny teacher keeps random weights on those features,
so its output jitters in t and the JVP's ∂F/∂t term dominates g (‖g‖ ≈ 8 instead of ≈ 1.5: the loss
then sits at its ceiling λ). The sCM paper uses c_noise = t for this reason. The toy keeps the Wan
architecture and zeroes the 6 highest frequencies' weights in the time MLP (teacher and student).
"""
import copy
import math

import pytest
import torch

from rcm.losses import SCMConfig, scm_loss
from rcm.models.trigflow import FunctionalNet
from rcm.samplers import (
    consistency_times,
    sample_consistency,
    sample_unipc,
    shifted_flow_times,
    student_denoiser,
    teacher_velocity,
)

wan = pytest.importorskip("rcm.models.wan")

SHAPE = (2, 1, 4, 4)  # C, T, H, W: 4 tokens of a (1, 2, 2) patch
SLOW_FREQUENCIES_FROM = 6


def toy_data(n: int, generator: torch.Generator) -> torch.Tensor:
    sign = torch.sign(torch.randn(n, *SHAPE, generator=generator))
    return sign + 0.5 * torch.randn(n, *SHAPE, generator=generator)


def keep_slow_time_frequencies(net) -> None:
    """Zero (and keep at zero) the time MLP's weights on the fastest sinusoids [cos | sin] halves."""
    half = net.config.freq_dim // 2
    mask = torch.ones(net.config.freq_dim)
    mask[:SLOW_FREQUENCIES_FROM] = 0
    mask[half: half + SLOW_FREQUENCIES_FROM] = 0
    weight = net.time_embedding[0].weight
    with torch.no_grad():
        weight.mul_(mask)
    weight.register_hook(lambda grad: grad * mask)


def train_teacher(steps: int, generator: torch.Generator):
    cfg = wan.wan_config("wan-tiny", dim=64, num_heads=1, ffn_dim=128, num_layers=1, in_dim=2, out_dim=2,
                         text_len=1, text_dim=8, freq_dim=32)
    torch.manual_seed(0)
    net = wan.WanDiT(cfg)
    keep_slow_time_frequencies(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    batch = 128
    context = torch.zeros(batch, 1, 8)
    for _ in range(steps):  # rectified-flow matching: v ≈ ε − x0 at x_ρ = (1 − ρ) x0 + ρ ε
        x0 = toy_data(batch, generator)
        eps = torch.randn(x0.shape, generator=generator)
        rho = torch.sigmoid(1.2 * torch.randn(batch, generator=generator) + 0.3)
        r = rho.view(-1, 1, 1, 1, 1)
        loss = ((net((1 - r) * x0 + r * eps, 1000 * rho, context) - (eps - x0)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def test_scm_distillation_of_a_tiny_wan_teacher():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run()
    finally:
        torch.set_num_threads(threads)


def _run():
    gen = torch.Generator().manual_seed(0)
    teacher = train_teacher(500, gen)

    # the teacher's ODE samples from the student's start: x_t = z at t0 = arctan 80 is the RF state
    # z/(cos t0 + sin t0) at ρ0 = 80/81, which is where the schedule with sigma_max = 80 starts
    n_eval = 256
    z = torch.randn(n_eval, *SHAPE, generator=torch.Generator().manual_seed(7))
    ctx_eval = torch.zeros(n_eval, 1, 8)
    t0 = math.atan(80.0)
    ode = sample_unipc(teacher_velocity(teacher, ctx_eval), z.double() / (math.cos(t0) + math.sin(t0)),
                       shifted_flow_times(30, sigma_max=80.0))

    def one_step(net):
        return sample_consistency(student_denoiser(net, ctx_eval), z, consistency_times(1, sigma_max=80.0))

    teacher_1step_error = ((one_step(teacher) - ode) ** 2).mean().item()

    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    keep_slow_time_frequencies(student)
    params = dict(student.named_parameters())
    train_cfg = SCMConfig(guidance=1.0, tangent_warmup=50)
    eval_cfg = SCMConfig(guidance=1.0, tangent_warmup=0)

    def eval_loss():
        g = torch.Generator().manual_seed(123)
        loss, diag = scm_loss(FunctionalNet(student, params), teacher, toy_data(512, g), torch.zeros(512, 1, 8),
                              iteration=0, config=eval_cfg, generator=g)
        return loss.mean().item(), diag["g_norm"].mean().item()

    loss_before, g_before = eval_loss()
    opt = torch.optim.Adam(params.values(), lr=3e-4, betas=(0.9, 0.99))
    batch = 64
    context = torch.zeros(batch, 1, 8)
    for it in range(300):
        loss, diag = scm_loss(FunctionalNet(student, params), teacher, toy_data(batch, gen), context,
                              iteration=it, config=train_cfg, generator=gen)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        assert diag["nonfinite"] == 0
    loss_after, g_after = eval_loss()
    student_1step_error = ((one_step(student) - ode) ** 2).mean().item()

    report = (f"sCM loss {loss_before:.2f} -> {loss_after:.2f}, |g| {g_before:.3f} -> {g_after:.3f}; "
              f"1-step MSE to the teacher's ODE samples: teacher {teacher_1step_error:.4f}, "
              f"student {student_1step_error:.4f}")
    print(report)
    # (seeds 0-3 give loss ratios 0.76-0.84, |g| ratios 0.29-0.43, 1-step MSE ratios < 0.01)
    assert loss_after < 0.9 * loss_before, report
    assert g_after < 0.6 * g_before, report
    assert student_1step_error < 0.1 * teacher_1step_error, report
