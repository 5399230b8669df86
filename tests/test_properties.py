"""Property-based tests (hypothesis) of the attention op and the losses (issue 8, acceptance 4).

Attention: random valid shapes (B, Lq ≠ Lk, H, head dims multiples of 8), fp32/fp64, scales and input
magnitudes, and chunk sizes of the reference backend's online softmax (so the chunk seams are crossed):
outputs finite and equal to fp64 math attention, for the forward, the tangent of every JVP path
(no-grad fused pass and the autograd.Function rule) and the gradients.

Losses: sCM, DMD and the fake-score critic on tiny nonlinear velocity networks over random batches,
shapes, times, guidance and scales: finite, equal to a direct transcription of docs/method.md's
formulas (values and parameter gradients), and a non-finite sample changes nothing for the others.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rcm.kernels import attention  # noqa: E402
from rcm.kernels import reference as reference_backend  # noqa: E402
from rcm.losses import DMDConfig, SCMConfig, dmd_loss, fake_score_loss, scm_loss  # noqa: E402

f64 = torch.float64
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)
LOSS_PROPERTY = settings(PROPERTY, max_examples=50)

# ---------------------------------------------------------------------------------------------------
# attention


def math_attention(q, k, v, scale):
    """softmax(scale q kᵀ) v, [B, L, H, D], computed as written (fp64 in these tests)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


@st.composite
def attention_inputs(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d = draw(st.sampled_from([8, 16, 24, 32, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    magnitude = draw(st.floats(0.1, 3.0))  # up to |logits| of a few tens: saturated softmax rows
    chunks = draw(st.sampled_from([(512, 512), (7, 5), (16, 3)]))  # query, key chunks of the online softmax
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def rand(length):
        return torch.randn(b, length, h, d, generator=g, dtype=f64)

    q, k, v = rand(lq) * magnitude, rand(lk) * magnitude, rand(lk)
    tangents = rand(lq), rand(lk), rand(lk)
    weight = rand(lq)  # of the loss sum(out * weight), for the gradients
    return dict(qkv=(q, k, v), tangents=tangents, weight=weight, dtype=dtype, scale=scale, chunks=chunks)


def _close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    err = (actual.to(f64) - expected).abs().max().item()
    assert err <= tol * (1 + expected.abs().max().item()), f"{what}: max error {err:.3g} ({dtype})"


@PROPERTY
@given(attention_inputs())
def test_attention_matches_fp64_math(case):
    dtype, chunks = case["dtype"], case["chunks"]
    q, k, v = (x.to(dtype) for x in case["qkv"])
    tangents = tuple(x.to(dtype) for x in case["tangents"])
    scale = case["scale"]
    exact_scale = q.shape[-1] ** -0.5 if scale is None else scale
    q64, k64, v64 = case["qkv"]

    def ours(q, k, v):
        return attention(q, k, v, scale=scale, backend="reference")

    def exact(q, k, v):
        return math_attention(q, k, v, exact_scale)

    expected, expected_dot = torch.func.jvp(exact, (q64, k64, v64), case["tangents"])
    with mock.patch.object(reference_backend, "_QUERY_CHUNK", chunks[0]), \
            mock.patch.object(reference_backend, "_KEY_CHUNK", chunks[1]):  # fmt: skip
        out = ours(q, k, v)
        assert out.dtype == dtype and out.shape == expected.shape
        _close(out, expected, dtype, "forward")
        with torch.no_grad():  # the fused primal + tangent pass (sCM's no-grad JVP)
            primal, tangent = torch.func.jvp(ours, (q, k, v), tangents)
        _close(primal, expected, dtype, "jvp primal (no grad)")
        _close(tangent, expected_dot, dtype, "jvp tangent (no grad)")
        _, tangent = torch.func.jvp(ours, (q, k, v), tangents)  # through the autograd.Function's jvp rule
        _close(tangent, expected_dot, dtype, "jvp tangent (grad mode)")

        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        grads = torch.autograd.grad((ours(*leaves) * case["weight"].to(dtype)).sum(), leaves)
    leaves64 = [x.detach().requires_grad_(True) for x in (q64, k64, v64)]
    expected_grads = torch.autograd.grad((exact(*leaves64) * case["weight"]).sum(), leaves64)
    for name, grad, expected_grad in zip("qkv", grads, expected_grads):
        assert grad.dtype == dtype
        _close(grad, expected_grad, dtype, f"d{name}")


_CORRUPTIONS = ["rank", "int dtype", "bool dtype", "complex dtype", "mixed dtypes", "k/v lengths", "batch", "heads",
                "head dim", "empty", "head dim not a multiple of 8", "head dim too large", "head dim 0",
                "scale", "not a tensor"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(_CORRUPTIONS), st.sampled_from(["q", "k", "v"]), st.integers(0, 10**6))
def test_attention_rejects_bad_input_with_a_value_error(corruption, which, seed):
    """Whatever is wrong with the input, the op raises one ValueError naming it, never another error."""
    rng = torch.Generator().manual_seed(seed)
    b, lq, lk, h = (int(torch.randint(1, 4, (), generator=rng)) for _ in range(4))
    d = 8 * int(torch.randint(1, 5, (), generator=rng))
    shapes = {"q": [b, lq, h, d], "k": [b, lk, h, d], "v": [b, lk, h, d]}
    dtypes = dict.fromkeys(shapes, torch.float32)
    scale, replace = None, None
    if corruption == "rank":
        shapes[which] = shapes[which][:3] if seed % 2 else [*shapes[which], 1]
    elif corruption.endswith(" dtype"):
        dtypes[which] = {"int": torch.int32, "bool": torch.bool, "complex": torch.complex64}[corruption.split()[0]]
    elif corruption == "mixed dtypes":
        dtypes[which] = torch.float64
    elif corruption == "k/v lengths":
        shapes["k" if which == "v" else "v"][1] += 1
    elif corruption in ("batch", "heads", "head dim"):
        shapes[which][{"batch": 0, "heads": 2, "head dim": 3}[corruption]] += 8
    elif corruption == "empty":
        dim = seed % 4
        for name in (["q", "k", "v"] if dim != 1 else [which if which == "q" else "k", "v"]):
            shapes[name][dim] = 0
    elif corruption.startswith("head dim"):
        d = {"head dim not a multiple of 8": d + 4, "head dim too large": 264, "head dim 0": 0}[corruption]
        for name in shapes:
            shapes[name][3] = d
    elif corruption == "scale":
        scale = [0.0, -1.0, float("nan"), float("inf"), "0.5", True, torch.tensor(0.5)][seed % 7]
    else:
        replace = [None, [1.0, 2.0], 3.0][seed % 3]
    inputs = {n: torch.zeros(shapes[n], dtype=dtypes[n]) for n in shapes}
    if replace is not None or corruption == "not a tensor":
        inputs[which] = replace
    with pytest.raises(ValueError, match="^attention: "):
        attention(inputs["q"], inputs["k"], inputs["v"], scale=scale, backend="reference")


# ---------------------------------------------------------------------------------------------------
# losses


class VelocityNet(nn.Module):
    """A tiny nonlinear per-sample velocity field v(x, timestep, context); context [B] shifts v."""

    def __init__(self, numel: int, dtype: torch.dtype, seed: int, hidden: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(numel + 2, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, numel, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)

    def forward(self, x, timestep, context):
        tau = timestep[:, None].to(self.inp.weight.dtype) / 1000
        h = torch.cat([x.flatten(1).to(self.inp.weight.dtype), torch.sin(3 * tau), tau**2], dim=1)
        v = self.out(torch.tanh(self.inp(h))).view(x.shape)
        return v + context.reshape(-1, *([1] * (x.ndim - 1))).to(v.dtype)


def _b(t, x):
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def velocity(net, x, timestep, context):
    """The network in its own dtype (timestep at least fp32), its output in float64."""
    dtype = net.inp.weight.dtype
    return net(x.to(dtype), timestep.to(torch.promote_types(dtype, torch.float32)), context).to(f64)


def guided(net, w, negative):
    if w <= 1:
        return lambda x, ts, ctx: velocity(net, x, ts, ctx)
    return lambda x, ts, ctx: (velocity(net, x, ts, negative)
                               + w * (velocity(net, x, ts, ctx) - velocity(net, x, ts, negative)))  # fmt: skip


def denoise(v_of, x_t, t, context):
    """docs/method.md §1.4 written out: x_ρ = x_t/(c + s), ρ = s/(c + s), v = net(x_ρ, 1000ρ);
    x̂0 = (x_t − s v)/(c + s), F = ((c − s) x_t + v)/(c + s)."""
    c, s = _b(torch.cos(t), x_t), _b(torch.sin(t), x_t)
    v = v_of(x_t / (c + s), 1000 * torch.sin(t) / (torch.cos(t) + torch.sin(t)), context)
    return (x_t - s * v) / (c + s), ((c - s) * x_t + v) / (c + s)


@st.composite
def loss_inputs(draw):
    b = draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dtype = draw(st.sampled_from([torch.float32, f64]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(draw(st.lists(st.floats(1e-3, math.pi / 2), min_size=b, max_size=b)), dtype=f64)
    numel = math.prod(shape)
    return dict(
        x0=torch.randn(b, *shape, generator=g, dtype=f64), noise=torch.randn(b, *shape, generator=g, dtype=f64),
        t=t, context=torch.randn(b, generator=g, dtype=f64), negative=torch.zeros(b, dtype=f64),
        nets=[VelocityNet(numel, dtype, seed + i) for i in range(3)], dtype=dtype,
        guidance=draw(st.sampled_from([1.0, 3.0, 5.5])), scale=draw(st.floats(0.1, 100.0)),
        bad=draw(st.lists(st.booleans(), min_size=b, max_size=b)))  # fmt: skip


def _rel_close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite"
    if actual.numel() == 0:
        return
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    err = (actual - expected).abs().max().item()
    assert err <= tol * (1 + expected.abs().max().item()), f"{what}: max error {err:.3g} ({dtype})"


def _grads(module):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def _zero_grads(*modules):
    for m in modules:
        m.zero_grad(set_to_none=True)


def _with_bad_samples(x, bad):
    mask = torch.tensor(bad)
    return torch.where(_b(mask, x), torch.full_like(x, float("nan")), x), mask


@LOSS_PROPERTY
@given(loss_inputs(), st.integers(0, 6), st.sampled_from([0, 4]), st.floats(0.01, 1.0))
def test_scm_loss_matches_the_formula(case, iteration, warmup, eps):
    student, teacher = case["nets"][0], case["nets"][1].requires_grad_(False)
    x0, noise, t, ctx, neg = case["x0"], case["noise"], case["t"], case["context"], case["negative"]
    config = SCMConfig(loss_scale=case["scale"], guidance=case["guidance"], tangent_warmup=warmup,
                       tangent_norm_eps=eps)  # fmt: skip
    loss, diagnostics = scm_loss(student, teacher, x0, ctx, neg, iteration=iteration, config=config, t=t, noise=noise)
    loss.sum().backward()
    grads = _grads(student)
    assert loss.shape == t.shape and loss.dtype == f64 and int(diagnostics["nonfinite"]) == 0

    # §2: x_t = c x0 + s ε; F_tea guided; c s dF⁻/dt by a JVP along (c s F_tea, c s);
    # g = −c √(1 − r² s²)(F⁻ − F_tea) − r c s x_t − c s dF⁻/dt; ĝ = g/(‖g‖ + eps); L = λ Σ (F_θ − F⁻ − ĝ)².
    _zero_grads(student)
    c, s = _b(torch.cos(t), x0), _b(torch.sin(t), x0)
    x_t = c * x0 + s * noise
    with torch.no_grad():
        F_tea = denoise(guided(teacher, case["guidance"], neg), x_t, t, ctx)[1]
        F_student = lambda x, tt: denoise(guided(student, 1.0, None), x, tt, ctx)[1]  # noqa: E731
        cs = torch.cos(t) * torch.sin(t)
        _, cs_dF = torch.func.jvp(F_student, (x_t, t), (_b(cs, x_t) * F_tea, cs))
    F_theta = F_student(x_t, t)
    F_minus = F_theta.detach()
    r = 1.0 if warmup == 0 else min(1.0, iteration / warmup)
    g = -c * torch.sqrt(1 - (r * s) ** 2) * (F_minus - F_tea) - r * c * s * x_t - cs_dF
    g_hat = g / _b(g.flatten(1).norm(dim=1) + eps, g)
    expected = case["scale"] * ((F_theta - F_minus - g_hat) ** 2).flatten(1).sum(1)
    _rel_close(loss.detach(), expected.detach(), case["dtype"], "sCM loss")
    _rel_close(diagnostics["g_norm"], g.flatten(1).norm(dim=1), case["dtype"], "‖g‖")
    expected.sum().backward(retain_graph=True)
    for grad, expected_grad in zip(grads, _grads(student)):
        _rel_close(grad, expected_grad, case["dtype"], "sCM student gradient")

    # non-finite samples: loss and gradient exactly 0 for them, unchanged for the others
    if any(case["bad"]):
        _zero_grads(student)
        bad_x0, mask = _with_bad_samples(x0, case["bad"])
        guarded, diagnostics = scm_loss(student, teacher, bad_x0, ctx, neg, iteration=iteration, config=config,
                                        t=t, noise=noise)  # fmt: skip
        assert int(diagnostics["nonfinite"]) == int(mask.sum()) and torch.isfinite(guarded).all()
        assert torch.equal(guarded[mask], torch.zeros_like(guarded[mask]))
        _rel_close(guarded[~mask].detach(), loss[~mask].detach(), case["dtype"], "other samples' sCM loss")
        guarded.sum().backward()
        guarded_grads = _grads(student)
        _zero_grads(student)
        expected[~mask].sum().backward()
        for grad, expected_grad in zip(guarded_grads, _grads(student)):
            _rel_close(grad, expected_grad, case["dtype"], "other samples' sCM gradient")


@LOSS_PROPERTY
@given(loss_inputs(), st.sampled_from([1e-5, 0.5]))
def test_dmd_loss_matches_the_formula(case, omega_min):
    teacher, fake = case["nets"][1].requires_grad_(False), case["nets"][2].requires_grad_(False)
    t, noise, ctx, neg = case["t"], case["noise"], case["context"], case["negative"]
    G = case["x0"].float().requires_grad_(True)  # student samples come out of the rollout in fp32
    config = DMDConfig(loss_scale=case["scale"], guidance=case["guidance"], omega_min=omega_min)
    loss, diagnostics = dmd_loss(G, teacher, fake, ctx, neg, config=config, t=t, noise=noise)
    (grad_G,) = torch.autograd.grad(loss.sum(), G)
    assert loss.shape == t.shape and loss.dtype == f64 and int(diagnostics["nonfinite"]) == 0

    # §3.3: x^D = c G + s ε; ω = max(mean|G − x̂0_real|, ω_min); Δ = (x̂0_fake − x̂0_real)/ω;
    # L = λ Σ Δ² in value, ∂L/∂G = 2λΔ.
    G64 = G.detach().to(f64)
    x_D = _b(torch.cos(t), G64) * G64 + _b(torch.sin(t), G64) * noise
    x0_fake = denoise(guided(fake, 1.0, None), x_D, t, ctx)[0]
    x0_real = denoise(guided(teacher, case["guidance"], neg), x_D, t, ctx)[0]
    omega = (G64 - x0_real).abs().flatten(1).mean(1).clamp_min(omega_min)
    delta = (x0_fake - x0_real) / _b(omega, x0_fake)
    dtype = case["dtype"]
    _rel_close(loss.detach(), case["scale"] * (delta**2).flatten(1).sum(1), dtype, "DMD loss")
    _rel_close(diagnostics["omega"], omega, dtype, "ω")
    _rel_close(grad_G.to(f64), 2 * case["scale"] * delta, torch.float32, "DMD ∂L/∂G")  # G is fp32

    if any(case["bad"]):
        bad_G, mask = _with_bad_samples(G.detach(), case["bad"])
        bad_G.requires_grad_(True)
        guarded, diagnostics = dmd_loss(bad_G, teacher, fake, ctx, neg, config=config, t=t, noise=noise)
        (guarded_grad,) = torch.autograd.grad(guarded.sum(), bad_G)
        assert int(diagnostics["nonfinite"]) == int(mask.sum()) and torch.isfinite(guarded).all()
        assert torch.equal(guarded[mask], torch.zeros_like(guarded[mask]))
        assert torch.equal(guarded_grad[mask], torch.zeros_like(guarded_grad[mask]))
        _rel_close(guarded[~mask].detach(), loss[~mask].detach(), dtype, "other samples' DMD loss")
        _rel_close(guarded_grad[~mask].to(f64), grad_G[~mask].to(f64), torch.float32, "other samples' DMD ∂L/∂G")


@LOSS_PROPERTY
@given(loss_inputs(), st.sampled_from([None, 10.0, 1e4]))
def test_fake_score_loss_matches_the_formula(case, cap):
    fake = case["nets"][2]
    t, noise, ctx = case["t"], case["noise"], case["context"]
    G = case["x0"].float()
    config = DMDConfig(critic_max_weight=cap)
    loss, diagnostics = fake_score_loss(G, fake, ctx, config=config, t=t, noise=noise)
    loss.sum().backward()
    grads = _grads(fake)
    assert loss.shape == t.shape and loss.dtype == f64

    # §3.4: L = w(t) Σ (G − x̂0_fake(x^D, t))², w = 1/sin² t (capped), gradients into the fake score only.
    _zero_grads(fake)
    G64 = G.to(f64)
    x_D = _b(torch.cos(t), G64) * G64 + _b(torch.sin(t), G64) * noise
    weight = 1 / torch.sin(t) ** 2
    weight = weight if cap is None else weight.clamp_max(cap)
    expected = weight * ((G64 - denoise(guided(fake, 1.0, None), x_D, t, ctx)[0]) ** 2).flatten(1).sum(1)
    _rel_close(loss.detach(), expected.detach(), case["dtype"], "critic loss")
    _rel_close(diagnostics["weight"], weight, case["dtype"], "critic weight")
    expected.sum().backward()
    for grad, expected_grad in zip(grads, _grads(fake)):
        _rel_close(grad, expected_grad, case["dtype"], "critic gradient")

    # non-finite samples: loss and gradient exactly 0 for them, the others' gradient that of `expected` alone
    if any(case["bad"]):
        _zero_grads(fake)
        bad_G, mask = _with_bad_samples(G, case["bad"])
        guarded, diagnostics = fake_score_loss(bad_G, fake, ctx, config=config, t=t, noise=noise)
        assert int(diagnostics["nonfinite"]) == int(mask.sum()) and torch.isfinite(guarded).all()
        assert torch.equal(guarded[mask], torch.zeros_like(guarded[mask]))
        _rel_close(guarded[~mask].detach(), loss[~mask].detach(), case["dtype"], "other samples' critic loss")
        guarded.sum().backward()
        guarded_grads = _grads(fake)
        _zero_grads(fake)
        expected = weight * ((G64 - denoise(guided(fake, 1.0, None), x_D, t, ctx)[0]) ** 2).flatten(1).sum(1)
        expected[~mask].sum().backward()
        for grad, expected_grad in zip(guarded_grads, _grads(fake)):
            _rel_close(grad, expected_grad, case["dtype"], "other samples' critic gradient")
