"""rcm.kernels.attention: every transform against fp64 math attention, compile, opcheck, DTensor, bad input."""

import os
import socket

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from rcm.kernels import attention
from rcm.kernels import ops, reference


def math_attention(q, k, v, scale=None):
    """Plain O(L^2) attention in the inputs' precision: the reference every check compares to."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def rel_err(a, b):
    """Relative L2 error. The inputs are unit normal, so every reference is O(1) unless it is exactly zero
    (e.g. dq when Lk = 1): the floor of 1 measures such a one on the problem's own scale, not on its roundoff."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1.0)).item()


# (B, Lq, Lk, H, D): awkward sizes around the reference chunk (512), L=1, Lq != Lk.
SHAPES = [(2, 37, 37, 3, 16), (1, 1, 1, 2, 8), (1, 1, 70, 2, 16), (2, 600, 45, 2, 8), (1, 513, 1030, 1, 16)]


def draw(shape, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    B, Lq, Lk, H, D = shape
    return [torch.randn(B, L, H, D, generator=g, dtype=dtype) for L in (Lq, Lk, Lk, Lq, Lk, Lk)]


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_jvp_match_fp64_math(shape):
    q, k, v, tq, tk, tv = draw(shape)
    assert rel_err(attention(q, k, v), math_attention(q, k, v)) < 1e-12

    out, tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    out_ref, tangent_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    assert rel_err(out, out_ref) < 1e-12 and rel_err(tangent, tangent_ref) < 1e-12

    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)  # order-independent
    grads = torch.func.grad(lambda *a: (attention(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    grads_ref = torch.func.grad(lambda *a: (math_attention(*a) * cot).sum(), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < 1e-12


@pytest.mark.parametrize("which", [(0,), (1,), (2,), (0, 2), (1, 2)])
def test_jvp_with_some_tangents(which):
    """Tangents only for some inputs (the others are constants in the closure, i.e. tangent None)."""
    q, k, v, *tangents = draw((2, 40, 23, 2, 16))

    def partial(fn):
        def f(*active):
            args = [q, k, v]
            for i, a in zip(which, active):
                args[i] = a
            return fn(*args)

        return f

    primals = tuple((q, k, v)[i] for i in which)
    tans = tuple(tangents[i] for i in which)
    _, t = torch.func.jvp(partial(attention), primals, tans)
    _, t_ref = torch.func.jvp(partial(math_attention), primals, tans)
    assert rel_err(t, t_ref) < 1e-12


def test_jvp_paths_agree_with_and_without_grad_mode():
    """Under no_grad the fused op is called directly; with grad on, the autograd.Function's jvp is used."""
    q, k, v, tq, tk, tv = draw((1, 50, 31, 2, 8))
    _, t_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    with torch.no_grad():
        _, t_nograd = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    qg = q.clone().requires_grad_()
    out, t_grad = torch.func.jvp(attention, (qg, k, v), (tq, tk, tv))
    assert rel_err(t_nograd, t_ref) < 1e-12 and rel_err(t_grad, t_ref) < 1e-12
    # the primal of a grad-mode JVP stays differentiable
    out.sum().backward()
    qr = q.clone().requires_grad_()
    math_attention(qr, k, v).sum().backward()
    assert rel_err(qg.grad, qr.grad) < 1e-12


def test_gradient_through_tangent_fails_loudly():
    q, k, v, tq, _, _ = draw((1, 10, 10, 1, 8))
    qg = q.clone().requires_grad_()
    _, t = torch.func.jvp(lambda x: attention(x, k, v), (qg,), (tq,))
    with pytest.raises(RuntimeError, match="attention_forward_jvp"):
        t.sum().backward()


def test_forward_ad_dual_tensors():
    q, k, v, tq, tk, tv = draw((2, 33, 17, 2, 8))
    with fwAD.dual_level():
        out = attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), v)
        tangent = fwAD.unpack_dual(out).tangent
    _, t_ref = torch.func.jvp(lambda a, b: math_attention(a, b, v), (q, k), (tq, tk))
    assert rel_err(tangent, t_ref) < 1e-12


def test_vmap_over_tangents_and_jacfwd():
    q, k, v, *_ = draw((1, 9, 6, 2, 8))
    many = torch.randn(5, *q.shape, dtype=q.dtype)

    def tangent_of(fn):
        return lambda tq: torch.func.jvp(lambda x: fn(x, k, v), (q,), (tq,))[1]

    assert rel_err(torch.func.vmap(tangent_of(attention))(many), torch.func.vmap(tangent_of(math_attention))(many)) < 1e-12
    qs, ks, vs = q[:, :4], k[:, :3], v[:, :3]
    jac = torch.func.jacfwd(attention, argnums=(0, 1, 2))(qs, ks, vs)
    jac_ref = torch.func.jacfwd(math_attention, argnums=(0, 1, 2))(qs, ks, vs)
    for j, j_ref in zip(jac, jac_ref):
        assert rel_err(j, j_ref) < 1e-12
    # vmap over batched primals of different shapes per call
    qb = torch.randn(3, *q.shape, dtype=q.dtype)
    assert rel_err(torch.func.vmap(lambda x: attention(x, k, v))(qb), torch.func.vmap(lambda x: math_attention(x, k, v))(qb)) < 1e-12


def test_scale_argument():
    q, k, v, tq, _, _ = draw((1, 20, 20, 2, 16))
    assert rel_err(attention(q, k, v, scale=0.37), math_attention(q, k, v, scale=0.37)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_accumulates_in_fp32(dtype, tol):
    q, k, v, tq, tk, tv = draw((1, 300, 300, 2, 16), dtype=dtype)
    ref = [x.double() for x in (q, k, v, tq, tk, tv)]
    with torch.no_grad():
        out, t = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    out_ref, t_ref = torch.func.jvp(math_attention, tuple(ref[:3]), tuple(ref[3:]))
    assert out.dtype == dtype and t.dtype == dtype
    assert rel_err(out, out_ref) < tol and rel_err(t, t_ref) < tol


def test_no_quadratic_buffer():
    """The reference backend never materializes an L x L score matrix."""
    L = 2048
    q = torch.randn(1, L, 1, 8)
    biggest = []

    def watch(*_args):
        pass

    import torch.utils._python_dispatch as pd

    class Watch(pd.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    biggest.append(t.numel())
            return out

    with Watch():
        reference.forward_jvp(q, q, q, q, q, q, 0.3)
    assert max(biggest) <= reference._QUERY_CHUNK * reference._KEY_CHUNK < L * L


def test_opcheck():
    q, k, v, tq, tk, tv = draw((1, 12, 7, 2, 8), dtype=torch.float32)
    torch.library.opcheck(torch.ops.rcm.attention_forward.default, (q, k, v, 0.3, "reference"))
    torch.library.opcheck(torch.ops.rcm.attention_forward_jvp.default, (q, k, v, tq, None, tv, 0.3, "reference"))
    out, lse = torch.ops.rcm.attention_forward(q, k, v, 0.3, "reference")
    torch.library.opcheck(torch.ops.rcm.attention_backward.default, (torch.randn_like(out), q, k, v, out, lse, 0.3, "reference"))
    qg = q.clone().requires_grad_()
    torch.library.opcheck(torch.ops.rcm.attention_forward.default, (qg, k, v, 0.3, "reference"))


# --------------------------------------------------------------------------------------------------------------
# torch.compile: forward, gradients and tangents must equal eager. A compiled JVP through an autograd.Function
# with a custom jvp silently returns zeros (docs/design.md, platform fact 3): the tangent checks below catch exactly that.


def _compile_inputs():
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, 24, 2, 16, generator=g) for _ in range(6)]


def test_compile_attention_forward_grad_and_tangent_equal_eager():
    torch._dynamo.reset()
    q, k, v, tq, tk, tv = _compile_inputs()

    def loss(q, k, v):
        return attention(q, k, v).square().sum()

    compiled = torch.compile(attention, fullgraph=True)
    assert rel_err(compiled(q, k, v), attention(q, k, v)) < 1e-6

    g_eager = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.compile(loss, fullgraph=True)(*qs).backward()
    for x, g in zip(qs, g_eager):
        assert rel_err(x.grad, g) < 1e-5

    def jvp(q, k, v, tq, tk, tv):
        with torch.no_grad():
            return torch.func.jvp(attention, (q, k, v), (tq, tk, tv))

    out_e, t_e = jvp(q, k, v, tq, tk, tv)
    out_c, t_c = torch.compile(jvp, fullgraph=True)(q, k, v, tq, tk, tv)
    assert t_e.norm() > 0.1 and t_c.norm() > 0.1, "compiled tangent vanished"
    assert rel_err(out_c, out_e) < 1e-6 and rel_err(t_c, t_e) < 1e-5
    # with grad mode on, compile must still give the right tangent (not zeros)
    t_c2 = torch.compile(lambda *a: torch.func.jvp(attention, a[:3], a[3:])[1])(q, k, v, tq, tk, tv)
    assert rel_err(t_c2, t_e) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the problem.


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)), "4 dims"),
        (lambda: (torch.randn(1, 4, 2, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8)), "same shape"),
        (lambda: (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8)), "heads"),
        (lambda: (torch.randn(2, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), "batch"),
        (lambda: (torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8).double(), torch.randn(1, 4, 2, 8)), "dtype"),
        (lambda: (torch.randn(1, 4, 2, 12), torch.randn(1, 4, 2, 12), torch.randn(1, 4, 2, 12)), "head dim 12"),
        (lambda: (torch.randn(1, 4, 2, 512), torch.randn(1, 4, 2, 512), torch.randn(1, 4, 2, 512)), "head dim 512"),
        (lambda: (torch.ones(1, 4, 2, 8, dtype=torch.int64),) * 3, "dtype"),
        (lambda: (torch.randn(1, 0, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), "empty"),
        (lambda: ([1.0], torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)), "q must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        attention(*make())


def test_bad_scale_and_backend():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="scale"):
        attention(x, x, x, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        attention(x, x, x, backend="cudnn-magic")
    with pytest.raises(ValueError, match="'triton' was requested"):
        attention(x, x, x, backend="triton")  # CPU tensors


def test_backend_override(monkeypatch):
    x = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "reference")
    assert ops.resolve_backend(x, x, x) == "reference"
    ops.set_backend("reference")
    try:
        assert ops.resolve_backend(x, x, x) == "reference"
    finally:
        ops.set_backend(None)
    monkeypatch.delenv("RCM_ATTENTION_BACKEND")
    assert ops.resolve_backend(x, x, x) == "reference"  # auto on CPU


# --------------------------------------------------------------------------------------------------------------
# DTensor: batch- and head-sharded inputs run through the registered sharding rules (2 processes, gloo).


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtensor_worker(rank, world, port, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(4, 10, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
        cot = torch.randn(4, 10, 4, 8, generator=g, dtype=torch.float64)
        out_ref = math_attention(q, k, v)
        qr = q.clone().requires_grad_()
        (math_attention(qr, k, v) * cot).sum().backward()
        errs = {}
        for name, dim in (("batch", 0), ("heads", 2)):
            dq, dk, dv = (distribute_tensor(x, mesh, [Shard(dim)]) for x in (q, k, v))
            dq.requires_grad_()
            out = attention(dq, dk, dv)
            assert out.placements == (Shard(dim),), out.placements
            (out * distribute_tensor(cot, mesh, [Shard(dim)])).sum().backward()
            errs[name] = (rel_err(out.full_tensor(), out_ref), rel_err(dq.grad.full_tensor(), qr.grad))
        results[rank] = errs
    finally:
        dist.destroy_process_group()


def test_dtensor_batch_and_head_sharding():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_dtensor_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert set(results.keys()) == {0, 1}
    for errs in results.values():
        for name, (e_out, e_grad) in errs.items():
            assert e_out < 1e-12 and e_grad < 1e-12, (name, e_out, e_grad)


# --------------------------------------------------------------------------------------------------------------
# Routing: tangent-free 16-bit CUDA calls go to PyTorch's SDPA (its own autograd); a call with a tangent never
# does (SDPA's fast backends have no forward AD: it would raise, or a custom route would drop the tangent).
# On the CPU the route is exercised by declaring fp64 CPU tensors SDPA-eligible (SDPA runs there too).


def test_select_route_rules(monkeypatch):
    x = torch.randn(1, 4, 2, 8)
    assert ops.select_route(x, x, x, has_tangent=False) == "reference"  # CPU: SDPA not eligible
    monkeypatch.setattr(ops, "sdpa_eligible", lambda q: True)
    assert ops.select_route(x, x, x, has_tangent=False) == "sdpa"
    assert ops.select_route(x, x, x, has_tangent=True) == "reference"  # a tangent is never routed to SDPA
    assert ops.select_route(x, x, x, "reference", has_tangent=False) == "reference"  # explicit backend wins
    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "reference")
    assert ops.select_route(x, x, x, has_tangent=False) == "reference"  # so does the environment
    monkeypatch.delenv("RCM_ATTENTION_BACKEND")
    ops.set_backend("reference")
    try:
        assert ops.select_route(x, x, x, has_tangent=False) == "reference"
    finally:
        ops.set_backend(None)
    # functorch-wrapped inputs (vmap, grad) keep to our ops
    seen = []
    torch.func.vmap(lambda a: seen.append(ops.select_route(a, a, a, has_tangent=False)) or a)(x.unsqueeze(0))
    assert seen == ["reference"]


def test_sdpa_eligibility():
    x = torch.randn(1, 4, 2, 64)
    assert not ops.sdpa_eligible(x)  # CPU
    if torch.cuda.is_available():
        assert ops.sdpa_eligible(x.cuda().bfloat16()) and ops.sdpa_eligible(x.cuda().half())
        assert not ops.sdpa_eligible(x.cuda())  # fp32 stays on our kernels


@pytest.fixture
def sdpa_on_cpu(monkeypatch):
    """fp64 CPU tensors count as SDPA-eligible; returns the list of calls that took the SDPA route."""
    calls = []
    real = ops._sdpa

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(ops, "sdpa_eligible", lambda q: q.dtype == torch.float64)
    monkeypatch.setattr(ops, "_sdpa", spy)
    return calls


def test_sdpa_route_primal_and_grad_match_fp64(sdpa_on_cpu):
    q, k, v, *_ = draw((2, 37, 21, 3, 16))
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    cot = torch.randn(2, 37, 3, 16, dtype=torch.float64)
    out = attention(*qs)
    assert len(sdpa_on_cpu) == 1
    (out * cot).sum().backward()
    qr = [x.clone().requires_grad_() for x in (q, k, v)]
    (math_attention(*qr) * cot).sum().backward()
    assert rel_err(out, math_attention(q, k, v)) < 1e-12
    for a, b in zip(qs, qr):
        assert rel_err(a.grad, b.grad) < 1e-12


def test_tangents_never_take_the_sdpa_route(sdpa_on_cpu):
    q, k, v, tq, tk, tv = draw((1, 30, 19, 2, 16))
    _, t_ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    with torch.no_grad():
        _, t_nograd = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    _, t_grad = torch.func.jvp(attention, (q.clone().requires_grad_(), k, v), (tq, tk, tv))
    with fwAD.dual_level():
        t_dual = fwAD.unpack_dual(attention(fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))).tangent
    jac = torch.func.jacfwd(attention)(q[:, :3], k[:, :4], v[:, :4])
    jac_ref = torch.func.jacfwd(math_attention)(q[:, :3], k[:, :4], v[:, :4])
    assert sdpa_on_cpu == []
    for t in (t_nograd, t_grad, t_dual):
        assert rel_err(t, t_ref) < 1e-12
    assert rel_err(jac, jac_ref) < 1e-12


def test_sdpa_route_under_compile_equals_eager(sdpa_on_cpu):
    torch._dynamo.reset()
    q, k, v, tq, tk, tv = draw((2, 24, 24, 2, 16))

    def loss(q, k, v):
        return attention(q, k, v).square().sum()

    g_eager = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)  # functorch-wrapped: our ops
    qs = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.compile(loss, fullgraph=True)(*qs).backward()
    assert len(sdpa_on_cpu) >= 1  # traced through the SDPA route
    for x, g in zip(qs, g_eager):
        assert rel_err(x.grad, g) < 1e-10

    def jvp(q, k, v, tq, tk, tv):
        return torch.func.jvp(attention, (q, k, v), (tq, tk, tv))

    n = len(sdpa_on_cpu)
    _, t_e = jvp(q, k, v, tq, tk, tv)
    _, t_c = torch.compile(jvp, fullgraph=True)(q, k, v, tq, tk, tv)
    assert len(sdpa_on_cpu) == n, "a compiled JVP was routed to SDPA"
    assert t_c.norm() > 0.1 and rel_err(t_c, t_e) < 1e-10


# --------------------------------------------------------------------------------------------------------------
# GPU: the public op's routes against fp64 (bf16 bound 1e-2 relative L2, as above).


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 1000, 1000, 3, 128), (1, 333, 1537, 2, 64), (2, 1, 77, 2, 128), (1, 517, 300, 4, 256)])
def test_gpu_public_op_routes_match_fp64(dtype, shape):
    q, k, v, tq, tk, tv = (x.cuda() for x in draw(shape, seed=3))
    cot = torch.randn_like(q)
    lo = [x.to(dtype) for x in (q, k, v, tq, tk, tv)]
    ref = [x.double() for x in lo]  # the rounded inputs, in fp64
    assert ops.select_route(*lo[:3], has_tangent=False) == "sdpa"
    leaves = [x.clone().requires_grad_() for x in lo[:3]]
    out = attention(*leaves)
    (out.float() * cot).sum().backward()
    leaves_ref = [x.clone().requires_grad_() for x in ref[:3]]
    out_ref = math_attention(*leaves_ref)
    (out_ref * cot).sum().backward()
    assert rel_err(out, out_ref) < 1e-2
    for a, b in zip(leaves, leaves_ref):
        assert a.grad.dtype == dtype and rel_err(a.grad, b.grad) < 1e-2
    _, t_ref = torch.func.jvp(math_attention, tuple(ref[:3]), tuple(ref[3:]))
    with torch.no_grad():
        _, t_nograd = torch.func.jvp(attention, tuple(lo[:3]), tuple(lo[3:]))
    _, t_grad = torch.func.jvp(attention, tuple(leaves), tuple(lo[3:]))
    for t in (t_nograd, t_grad):
        assert t.norm() > 0 and rel_err(t, t_ref) < 1e-2
    # backend='triton' forces our kernels for the primal path too
    leaves_t = [x.clone().requires_grad_() for x in lo[:3]]
    out_t = attention(*leaves_t, backend="triton")
    (out_t.float() * cot).sum().backward()
    assert rel_err(out_t, out_ref) < 1e-2
    for a, b in zip(leaves_t, leaves_ref):
        assert rel_err(a.grad, b.grad) < 1e-2
