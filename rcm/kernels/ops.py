"""The attention op: torch.library registration, fake impls, vmap rules and the differentiable entry point.

Three opaque custom ops carry the work (each dispatches to a backend module at run time; outputs are
always contiguous, which is what the fake impls promise):
    rcm::attention_forward      (q, k, v)            -> (out, lse)
    rcm::attention_forward_jvp  (q, k, v, q', k', v') -> (out, out', lse)      one fused pass
    rcm::attention_backward     (dout, q, k, v, out, lse) -> (dq, dk, dv)
torch.library has no forward-AD registration (a custom op under torch.func.jvp gives an all-zero tangent
without error), so differentiation goes through `_AttentionFunction`, a torch.autograd.Function whose
`jvp` and `backward` call these ops.

Backend selection lives here and only here (`select_route`): an explicit `backend=` argument, then
`set_backend()`, then $RCM_ATTENTION_BACKEND, then 'auto'. Under 'auto' on CUDA, tangent-free 16-bit
calls on plain tensors go to PyTorch's public `F.scaled_dot_product_attention` with its own autograd
(cuDNN first, then flash), the fastest primal forward and backward measured (docs/kernels.md); every
call that carries a tangent runs the fused Triton JVP kernel, because SDPA's fast backends have no
forward AD (docs/design.md, platform fact 4). 'triton' forces our kernels for everything, 'reference'
the pure-torch backend.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from . import reference

BACKENDS = ("reference", "triton")
ROUTES = ("sdpa", "triton", "reference")
_SDPA_DTYPES = (torch.bfloat16, torch.float16)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256  # the op: head dims that are multiples of 8 up to this
TRITON_HEAD_DIMS = (64, 128, 256)  # our Triton kernels' (others run the reference backend)
_ENV_BACKEND = "RCM_ATTENTION_BACKEND"
_forced_backend: str | None = None


def _backend_module(name: str):
    if name == "reference":
        return reference
    if name == "triton":
        try:  # triton is optional (CPU installs go without it; CUDA builds of torch bring it)
            from . import triton_attention
        except ImportError as e:
            raise ImportError(f"the Triton attention backend needs the triton package, which did not import "
                              f"({e}); install it (`pip install triton`) or use backend 'reference' / 'auto'") from e
        return triton_attention
    raise ValueError(f"attention backend must be one of {BACKENDS} or 'auto', got {name!r}")


def set_backend(name: str | None) -> None:
    """Force a backend for all later calls ('reference', 'triton'); None or 'auto' restores automatic choice."""
    global _forced_backend
    if name not in (None, "auto"):
        _backend_module(name)
    _forced_backend = None if name in (None, "auto") else name


def _triton_usable(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """None if the Triton backend can run these inputs, else why not."""
    if not q.is_cuda:
        return f"tensors are on {q.device.type}, the Triton backend needs CUDA"
    try:
        mod = _backend_module("triton")
    except ImportError as e:  # triton missing or our kernels failed to import
        return f"Triton backend unavailable ({e})"
    return mod.supports(q, k, v)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: explicit argument > set_backend() > $RCM_ATTENTION_BACKEND > 'auto'."""
    name = backend or _forced_backend or os.environ.get(_ENV_BACKEND) or "auto"
    if name != "auto":
        _backend_module(name)  # a ValueError for unknown names
    return name


def resolve_backend(q: Tensor, k: Tensor, v: Tensor, backend: str | None = None) -> str:
    """The backend of the custom ops for these inputs: 'triton' (CUDA, when it supports them) or 'reference'."""
    name = requested_backend(backend)
    if name == "auto":
        return "triton" if _triton_usable(q, k, v) is None else "reference"
    if name == "triton":
        reason = _triton_usable(q, k, v)
        if reason is not None:
            raise ValueError(f"attention backend 'triton' was requested but cannot run these inputs: {reason}")
    return name


def _plain_tensor(x: Tensor) -> bool:
    """A plain tensor: no subclass (DTensor has our sharding rules) and, in eager, no functorch wrapper
    (vmap / grad / jvp levels keep to our ops, whose vmap rules and Function are tested)."""
    if type(x) is not Tensor:
        return False
    return torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(x)


def sdpa_eligible(q: Tensor) -> bool:
    """Whether PyTorch's SDPA fast backends take these inputs: CUDA, 16-bit, head dim <= 256."""
    return q.is_cuda and q.dtype in _SDPA_DTYPES and q.shape[-1] <= MAX_HEAD_DIM


def select_route(q: Tensor, k: Tensor, v: Tensor, backend: str | None = None, *, has_tangent: bool) -> str:
    """The one routing decision: 'sdpa' (public F.scaled_dot_product_attention), 'triton' or 'reference'.

    'sdpa' is chosen only under 'auto', only without a tangent, and only for plain tensors SDPA's fast
    backends take; a call with a tangent is never routed there (it would lose the tangent or raise).
    """
    if (
        not has_tangent
        and requested_backend(backend) == "auto"
        and sdpa_eligible(q)
        and all(_plain_tensor(x) for x in (q, k, v))
    ):
        return "sdpa"
    return resolve_backend(q, k, v, backend)


def validate(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> float:
    """Check the public contract; return the softmax scale."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise ValueError(f"attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention: {name} must have layout [B, L, H, D] (4 dims), got shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"attention: {name} has dtype {x.dtype}; supported: bf16, fp16, fp32, fp64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape [B, Lk, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"attention: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, heads or head dim"
        )
    if Lq == 0 or k.shape[1] == 0 or B == 0 or H == 0:
        raise ValueError(f"attention: empty input (q {tuple(q.shape)}, k {tuple(k.shape)})")
    if not 8 <= D <= MAX_HEAD_DIM or D % 8 != 0:
        raise ValueError(f"attention: head dim {D} unsupported; expected a multiple of 8 up to {MAX_HEAD_DIM}")
    if scale is None:
        return D**-0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"attention: scale must be a positive finite number or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"attention: scale must be a positive finite number, got {scale}")
    return scale


# ---------------------------------------------------------------------------------------------------------------
# Custom ops. Opaque to torch.compile (fake impls give shapes), so the compiled graph calls them as they are.


@torch.library.custom_op("rcm::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    out, lse = _backend_module(backend).forward(q, k, v, scale)
    return out.contiguous(), lse.contiguous()


@attention_forward.register_fake
def _(q, k, v, scale, backend):
    B, Lq, H, _ = q.shape
    return q.new_empty(B, Lq, H, v.shape[-1]), q.new_empty(B, H, Lq, dtype=_lse_dtype(q))


@torch.library.custom_op("rcm::attention_forward_jvp", mutates_args=())
def attention_forward_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_dot: Optional[Tensor],
    k_dot: Optional[Tensor],
    v_dot: Optional[Tensor],
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    out, out_dot, lse = _backend_module(backend).forward_jvp(q, k, v, q_dot, k_dot, v_dot, scale)
    if out_dot is None:  # every tangent was None
        out_dot = torch.zeros_like(out)
    return out.contiguous(), out_dot.contiguous(), lse.contiguous()


@attention_forward_jvp.register_fake
def _(q, k, v, q_dot, k_dot, v_dot, scale, backend):
    B, Lq, H, _ = q.shape
    out = q.new_empty(B, Lq, H, v.shape[-1])
    return out, out.new_empty(out.shape), q.new_empty(B, H, Lq, dtype=_lse_dtype(q))


@torch.library.custom_op("rcm::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _backend_module(backend).backward(grad_out, q, k, v, out, lse, scale)
    return tuple(g.contiguous() for g in grads)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# Reverse-mode rule on the forward op itself, so the op is differentiable even when called directly
# (and so torch.library.opcheck's autograd-registration check holds).
def _forward_setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale, ctx.backend = scale, backend


def _forward_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attention_forward.register_autograd(_forward_backward, setup_context=_forward_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# vmap rules: fold the vmapped dim into the batch dim (the op is batched over B anyway).


def _fold(x: Tensor | None, bdim: int | None, size: int) -> Tensor | None:
    if x is None:
        return None
    x = x.movedim(bdim, 0) if bdim is not None else x.unsqueeze(0).expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


def _unfold(x: Tensor, size: int) -> Tensor:
    return x.reshape(size, x.shape[0] // size, *x.shape[1:])


@torch.library.register_vmap("rcm::attention_forward")
def _(info, in_dims, q, k, v, scale, backend):
    n = info.batch_size
    qd, kd, vd = in_dims[:3]
    out, lse = attention_forward(_fold(q, qd, n), _fold(k, kd, n), _fold(v, vd, n), scale, backend)
    return (_unfold(out, n), _unfold(lse, n)), (0, 0)


@torch.library.register_vmap("rcm::attention_forward_jvp")
def _(info, in_dims, q, k, v, q_dot, k_dot, v_dot, scale, backend):
    n = info.batch_size
    folded = [_fold(x, d, n) for x, d in zip((q, k, v, q_dot, k_dot, v_dot), in_dims[:6])]
    out, out_dot, lse = attention_forward_jvp(*folded, scale, backend)
    return (_unfold(out, n), _unfold(out_dot, n), _unfold(lse, n)), (0, 0, 0)


@torch.library.register_vmap("rcm::attention_backward")
def _(info, in_dims, grad_out, q, k, v, out, lse, scale, backend):
    n = info.batch_size
    folded = [_fold(x, d, n) for x, d in zip((grad_out, q, k, v, out, lse), in_dims[:6])]
    dq, dk, dv = attention_backward(*folded, scale, backend)
    return (_unfold(dq, n), _unfold(dk, n), _unfold(dv, n)), (0, 0, 0)


# ---------------------------------------------------------------------------------------------------------------
# The differentiable op.


class _AttentionGradFunction(torch.autograd.Function):
    """Reverse mode through rcm::attention_backward (no forward-mode rule: what torch.compile traces)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, scale, backend):
        out, lse = attention_forward(q, k, v, scale, backend)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)
        ctx.scale, ctx.backend = scale, backend

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        # no_grad: the op is opaque; without it torch.func.grad tries to track the custom op's outputs.
        with torch.no_grad():
            dq, dk, dv = attention_backward(grad_out, q, k, v, out, lse, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None


class _AttentionFunction(_AttentionGradFunction):
    """Adds forward mode through rcm::attention_forward_jvp (eager; see `attention` for compile)."""

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, _scale_dot, _backend_dot):
        q, k, v = ctx.saved_tensors
        # Not under no_grad: a gradient taken *through* the tangent must error, not silently vanish.
        # The fused pass recomputes the primal; its out is dropped (forward() already returned one).
        _, out_dot, _ = attention_forward_jvp(q, k, v, q_dot, k_dot, v_dot, ctx.scale, ctx.backend)
        return out_dot, None


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """PyTorch's SDPA on [B, L, H, D] views (no copies), cuDNN preferred, flash next; never the math backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(order, set_priority=True):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, backend: str | None = None) -> Tensor:
    """softmax(scale · q kᵀ) v for layout [B, L, H, D]; Lq ≠ Lk allowed; O(L) extra memory.

    Differentiable (backward), forward-AD capable (torch.func.jvp / forward_ad / jacfwd), vmap-able,
    torch.compile-able. `backend`: 'reference' (pure torch), 'triton' (CUDA) or None/'auto' (see
    `select_route`).
    """
    scale = validate(q, k, v, scale)
    compiling = torch.compiler.is_compiling()
    duals = [fwAD.unpack_dual(x) for x in (q, k, v)]
    has_tangent = any(d.tangent is not None for d in duals)
    route = select_route(q, k, v, backend, has_tangent=has_tangent)
    if route == "sdpa":
        return _sdpa(q, k, v, scale)
    if has_tangent:
        # (requires_grad is not visible through torch.func.jvp's wrappers, so grad mode decides.)
        if compiling or not torch.is_grad_enabled():
            # The JVP traced explicitly: one fused pass gives primal and tangent. This is the path of sCM's
            # no-grad JVP pass, and the only correct one under torch.compile, where an autograd.Function
            # with a custom jvp yields an all-zero tangent without error (pytorch issue 192985).
            # A gradient through this output fails loudly (the fused op has no autograd rule).
            out, out_dot, _ = attention_forward_jvp(
                *(d.primal for d in duals), *(d.tangent for d in duals), scale, route
            )
            return fwAD.make_dual(out, out_dot)
    # Dynamo cannot trace an autograd.Function with a custom jvp when grads are on, so compiled code gets
    # the reverse-mode-only Function (forward AD under compile is handled above).
    out, _ = (_AttentionGradFunction if compiling else _AttentionFunction).apply(q, k, v, scale, route)
    return out
