"""Deterministic tiny models, data and steps shared by the multi-process workers and the
single-process references of tests/test_parallel.py (both sides must build identical things)."""
from __future__ import annotations

import contextlib
import copy

import torch
from torch.distributed.tensor import DTensor

from rcm.losses import DMDConfig, RCMConfig, SCMConfig, scm_jvp, student_losses
from rcm.models.wan import WanDiT, wan_config
from rcm.train import OptimizerConfig

# Student iteration 1 of this schedule runs sCM (with the JVP) and DMD (a 2-step rollout).
LOSS = RCMConfig(scm=SCMConfig(tangent_warmup=1), dmd=DMDConfig(max_simulation_steps=2), student_update_freq=2)
OPTIM = OptimizerConfig(lr=1e-3, warmup=2)
STUDENT_ITERATION = 1
SHAPE = (2, 4, 2, 4, 4)  # B, C, T, H, W: patch grid 2x2x2 = 8 tokens (divisible by cp=2)


def teacher() -> WanDiT:
    torch.manual_seed(0)
    net = WanDiT(wan_config("wan-tiny"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero head: the teacher is not the zero function
        net.head.head.weight.normal_(0, 0.05, generator=g)
        net.head.head.bias.normal_(0, 0.05, generator=g)
    return net


def models() -> tuple[WanDiT, WanDiT, WanDiT]:
    """(teacher, student, fake score): the student and fake score start as perturbed copies."""
    t = teacher().requires_grad_(False)
    student, fake = copy.deepcopy(t), copy.deepcopy(t)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in (student, fake):
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return t, student.requires_grad_(True), fake.requires_grad_(True)


def batch(seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(SHAPE, generator=g)
    context = torch.randn(SHAPE[0], 8, 32, generator=g)
    return x0.to(device), context.to(device), torch.zeros_like(context).to(device)


def jvp_inputs(seed: int = 3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    F_teacher = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return x_t.to(device), t.to(device), F_teacher.to(device)


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def grads(model) -> dict[str, torch.Tensor]:
    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}


def student_step(teacher, student, fake, data_seed: int = 0, device="cpu", gathered: bool = False) -> dict:
    """The sCM tangent, then one rCM student iteration (sCM + DMD terms, each backpropagated).
    ``gathered``: run the JVP passes with the student's parameters gathered beforehand
    (``gathered_for_jvp`` / ``gathered_first_term``, the torch 2.11 + CUDA route)."""
    from rcm.parallel import gathered_first_term, gathered_for_jvp

    x0, context, negative = batch(data_seed, device)
    x_t, t, F_teacher = jvp_inputs(device=device)
    with gathered_for_jvp(student) if gathered else contextlib.nullcontext():
        tangent = scm_jvp(student, x_t, t, context, F_teacher)
    losses = {}
    generator = torch.Generator().manual_seed(5)
    terms = student_losses(student, teacher, fake, x0, context, negative, iteration=STUDENT_ITERATION,
                           config=LOSS, generator=generator)
    for name, per_sample, _ in gathered_first_term(terms, student) if gathered else terms:
        losses[name] = per_sample.detach().clone()
        per_sample.sum().backward()
    return {"tangent": tangent, "losses": losses, "grads": grads(student)}


def dit_inputs(seed: int = 4, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    timestep = torch.tensor([37.5, 912.25])
    context = torch.randn(SHAPE[0], 8, 32, generator=g)
    x_dot = torch.randn(SHAPE, generator=g)
    t_dot = torch.tensor([0.3, -1.1])
    weight = torch.randn(SHAPE, generator=g)  # fixed output weighting for a gradient check
    return tuple(v.to(device) for v in (x, timestep, context, x_dot, t_dot, weight))


def dit_checks(model, device="cpu") -> dict:
    """Outputs, JVP tangents (no-grad and grad-enabled) and gradients of a fixed output functional."""
    x, timestep, context, x_dot, t_dot, weight = dit_inputs(device=device)
    f = lambda x, t: model(x, t, context)  # noqa: E731
    with torch.no_grad():
        out = model(x, timestep, context)
        _, tangent_nograd = torch.func.jvp(f, (x, timestep), (x_dot, t_dot))
    primal, tangent_grad = torch.func.jvp(f, (x, timestep), (x_dot, t_dot))
    (model(x, timestep, context) * weight).sum().backward()
    return {"out": out, "tangent_nograd": tangent_nograd, "tangent_grad": tangent_grad.detach(),
            "jvp_primal": primal.detach(), "grads": grads(model)}


def variant_teacher() -> WanDiT:
    """An I2V DiT (conditioning channels y, CLIP image tokens) for the CP check of the Wan variants."""
    torch.manual_seed(5)
    net = WanDiT(wan_config("wan-tiny-i2v"))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        net.head.head.weight.normal_(0, 0.05, generator=g)
    return net


def variant_checks(model) -> dict:
    """Output, no-grad JVP tangent and gradients of an I2V DiT fed per-token timesteps (TI2V-style:
    the first latent frame's tokens at t = 0, their time tangent zero) with y and image tokens."""
    cfg = wan_config("wan-tiny-i2v")
    g = torch.Generator().manual_seed(7)
    x, x_dot, weight = (torch.randn(SHAPE, generator=g) for _ in range(3))
    y = torch.randn(SHAPE[0], cfg.cond_dim, *SHAPE[2:], generator=g)
    context = torch.randn(SHAPE[0], cfg.text_len, cfg.text_dim, generator=g)
    image = torch.randn(SHAPE[0], cfg.image_len, cfg.image_dim, generator=g)
    noisy = torch.arange(8) >= 4  # patch grid 2x2x2: the first frame's 4 tokens are the condition
    timestep = torch.tensor([[700.0], [250.0]]) * noisy
    t_dot = torch.tensor([[0.5], [-1.5]]) * noisy
    f = lambda x, t: model(x, t, context, y=y, image_context=image)  # noqa: E731
    with torch.no_grad():
        out, tangent = torch.func.jvp(f, (x, timestep), (x_dot, t_dot))
    (f(x, timestep) * weight).sum().backward()
    return {"out": out, "tangent": tangent, "grads": grads(model)}


class Task:
    """Random latents and text from a seeded generator, its position saved with the run."""

    def __init__(self, seed: int = 123):
        self.generator = torch.Generator().manual_seed(seed)

    def build_teacher(self):
        return teacher()

    def next_batch(self):
        x0 = torch.randn(SHAPE, generator=self.generator)
        return x0, torch.randn(SHAPE[0], 8, 32, generator=self.generator)

    def negative_context(self, context):
        return torch.zeros_like(context)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def snapshot(state) -> dict:
    """Everything of a TrainState that must survive a checkpoint, as full plain tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    out = {"iteration": state.iteration, "generator": state.generator.get_state(),
           "lr": state.student_optimizer.param_groups[0]["lr"],
           "critic_lr": state.critic_optimizer.param_groups[0]["lr"]}
    for name, model, opt in (("student", state.student, state.student_optimizer),
                             ("fake_score", state.fake_score, state.critic_optimizer)):
        msd, osd = get_state_dict(model, opt, options=opts)
        out[name] = {k: v.clone() for k, v in msd.items()}
        out[name + "_optimizer"] = {f"{k}/{s}": v.clone() if torch.is_tensor(v) else v
                                    for k, st in osd.get("state", {}).items() for s, v in st.items()}
    out["ema"] = {k: v.clone() for k, v in get_model_state_dict(state.ema, options=opts).items()}
    return out
