"""Ulysses context parallelism for the Wan DiT, applied from outside the model (docs/method.md §6, §9).

With a CP group of size P, every rank gets the full inputs (x, timestep, text) and:

    tokens = patch_embedding(x)[:, r·L/P : (r+1)·L/P]              sequence split (contiguous chunks)
    self-attention, per block:
        q, k, v = RoPE(proj(z_local), rope[chunk r])                 [B, L/P, H, D]
        q, k, v = all_to_all(q, k, v)                                 [B, L, H/P, D]   sequence ⇄ heads
        o       = attention(q, k, v)                                  full sequence, H/P heads
        o       = all_to_all⁻¹(o)                                     [B, L/P, H, D]
    cross-attention: local (sharded queries against the full text)
    out = all_gather(head(tokens_local))                             [B, L, out] on every rank

The collectives are ``torch.autograd.Function``s with all three rules: forward, ``jvp`` (the same
collective applied to the tangent, so ``torch.func.jvp`` passes through) and ``backward`` (the inverse
collective). Under ``torch.no_grad()`` a dual input (the sCM JVP pass) takes the
``fwAD.unpack_dual``/``make_dual`` route instead, as ``rcm.kernels.attention`` does: primals and
tangents travel in **one** collective. Under ``torch.compile`` (the grad pass; the JVP pass runs eager,
see docs/parallel.md) the same Functions without the ``jvp`` rule run functional collectives, so a
compiled context-parallel forward and backward trace as one graph (Dynamo refuses a custom ``jvp``).

The final gather's backward keeps the local chunk of the incoming gradient: every rank of the group
must compute the identical loss from the gathered output (identical random draws: see
``rcm.parallel.rank_seed``). Each rank's parameter gradients then hold its own tokens' share and the
sum over the group is the full gradient (FSDP sums over CP and averages over data-parallel ranks).

Applied from outside, no model code duplicated and no class swapped: a forward hook on the patch
embedding (split); every block's self-attention gets ``UlyssesAttention`` as its ``attention_fn``
(the all-to-alls around the attention op) and a pre-hook that hands it this rank's RoPE positions
(and per-token modulation rows); a forward hook on the head (gather).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from rcm import kernels
from rcm.models.wan import WanDiT

__all__ = [
    "UlyssesAttention",
    "all_to_all",
    "apply_context_parallel",
    "gather_sequence",
    "heads_to_sequence",
    "sequence_to_heads",
    "split_sequence",
]


# ------------------------------------------------------------------------------------------------
# The collectives on plain tensors.


def all_to_all(x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk j to rank j, and concatenate the
    chunks received (in rank order) along ``gather_dim``."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[scatter_dim] % world:
        raise ValueError(f"all_to_all: dim {scatter_dim} of shape {tuple(x.shape)} is not divisible by "
                         f"the group size {world}")
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    if torch.compiler.is_compiling():  # functional collective: traceable into one graph
        recv = funcol.all_to_all_single(send, None, None, group)
    else:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def _all_gather(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if torch.compiler.is_compiling():
        return torch.cat(funcol.all_gather_tensor(x.contiguous(), 0, group).chunk(world), dim=dim)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _local_chunk(x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(f"context parallelism: dim {dim} of shape {tuple(x.shape)} (the patch-token "
                         f"sequence) is not divisible by the CP size {world}; choose a latent whose "
                         f"T'·H'·W' is a multiple of cp")
    return x.chunk(world, dim=dim)[dist.get_rank(group)]


# ------------------------------------------------------------------------------------------------
# Differentiable collectives: forward, forward-AD (jvp) and reverse-mode (backward) rules.


class _AllToAllGrad(torch.autograd.Function):
    """``all_to_all`` of several same-shaped tensors in one collective (stacked on a new dim 0);
    reverse mode only: what ``torch.compile`` traces (Dynamo refuses a custom ``jvp``)."""

    @staticmethod
    def forward(group, scatter_dim, gather_dim, *xs):
        return tuple(all_to_all(torch.stack(xs), group, scatter_dim + 1, gather_dim + 1).unbind(0))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = inputs[:3]
        ctx.n = len(inputs) - 3

    @staticmethod
    def backward(ctx, *grads):  # unused outputs arrive as zeros (materialized grads)
        with torch.no_grad():
            out = all_to_all(torch.stack(grads), ctx.group, ctx.gather_dim + 1, ctx.scatter_dim + 1)
        return (None, None, None, *out.unbind(0))


class _AllToAll(_AllToAllGrad):
    """``_AllToAllGrad`` with its forward-AD rule: the same all-to-all applied to the tangents."""

    @staticmethod
    def jvp(ctx, _g, _s, _d, *tangents):
        return _AllToAll.forward(ctx.group, ctx.scatter_dim, ctx.gather_dim, *_fill_tangents(tangents))


class _GatherSequenceGrad(torch.autograd.Function):
    """All-gather along ``dim``; backward keeps the local chunk (the loss is replicated on the group).
    Reverse mode only (for ``torch.compile``)."""

    @staticmethod
    def forward(x, group, dim):
        return _all_gather(x, group, dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.group, ctx.dim = inputs
        ctx.shape = x.shape

    @staticmethod
    def backward(ctx, grad):
        return _local_chunk(grad, ctx.group, ctx.dim), None, None


class _GatherSequence(_GatherSequenceGrad):
    """``_GatherSequenceGrad`` with its forward-AD rule: the tangent is gathered the same way."""

    @staticmethod
    def jvp(ctx, x_dot, _g, _d):
        return _all_gather(x_dot, ctx.group, ctx.dim)


def _fill_tangents(tangents):
    # An input without a tangent gets None here; the collective still needs a tensor on every rank.
    ref = next((t for t in tangents if t is not None), None)
    return [torch.zeros_like(ref) if t is None else t for t in tangents]


def _dual_route(xs) -> tuple[list[Tensor], list[Tensor | None]] | None:
    """(primals, tangents) when the no-grad forward-AD route applies (a dual input, grad mode off)."""
    if torch.is_grad_enabled():
        return None  # the autograd.Function keeps the graph for backward (and errors through tangents)
    duals = [fwAD.unpack_dual(x) for x in xs]
    if all(d.tangent is None for d in duals):
        return None
    return [d.primal for d in duals], [d.tangent for d in duals]


def _a2a(xs: tuple[Tensor, ...], group, scatter_dim: int, gather_dim: int) -> tuple[Tensor, ...]:
    if dist.get_world_size(group) == 1:
        return tuple(xs)
    dual = _dual_route(xs)
    if dual is not None:
        primals, tangents = dual
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        out = all_to_all(torch.stack(primals + tangents), group, scatter_dim + 1, gather_dim + 1).unbind(0)
        n = len(primals)
        return tuple(fwAD.make_dual(p, t) for p, t in zip(out[:n], out[n:]))
    if torch.compiler.is_compiling():
        return _AllToAllGrad.apply(group, scatter_dim, gather_dim, *xs)
    return _AllToAll.apply(group, scatter_dim, gather_dim, *xs)


def sequence_to_heads(*xs: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, ...]:
    """``[B, L/P, H, D] -> [B, L, H/P, D]`` for each of ``xs`` (one collective for all of them)."""
    return _a2a(xs, group, scatter_dim=2, gather_dim=1)


def heads_to_sequence(*xs: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, ...]:
    """``[B, L, H/P, D] -> [B, L/P, H, D]``: the inverse of ``sequence_to_heads``."""
    return _a2a(xs, group, scatter_dim=1, gather_dim=2)


def gather_sequence(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """The full sequence from every rank's contiguous chunk, on every rank."""
    if dist.get_world_size(group) == 1:
        return x
    dual = _dual_route((x,))
    if dual is not None:
        (p,), (t,) = dual
        both = _all_gather(torch.stack([p, t]), group, dim + 1)
        return fwAD.make_dual(both[0], both[1])
    if torch.compiler.is_compiling():
        return _GatherSequenceGrad.apply(x, group, dim)
    return _GatherSequence.apply(x, group, dim)


def split_sequence(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (differentiable: plain indexing)."""
    if dist.get_world_size(group) == 1:
        return x
    return _local_chunk(x, group, dim)


# ------------------------------------------------------------------------------------------------
# Applying it to the DiT.


class UlyssesAttention:
    """An ``attention_fn`` for a self-attention whose tokens are sharded over ``group``: all-to-all to
    the full sequence with H/P heads, the inner attention, and back.

    Takes ``q, k, v [B, L/P, H, D]`` (RoPE already applied with this rank's positions), returns
    ``[B, L/P, H, D]``. ``inner``: the attention op (default ``rcm.kernels.attention``, looked up at
    call time)."""

    def __init__(self, group: dist.ProcessGroup, inner=None):
        self.group, self.inner = group, inner

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        world = dist.get_world_size(self.group)
        if q.shape[2] % world:
            raise ValueError(f"context parallelism: {q.shape[2]} heads are not divisible by cp={world}")
        q, k, v = sequence_to_heads(q, k, v, group=self.group)
        out = kernels.attention(q, k, v) if self.inner is None else self.inner(q, k, v)
        (out,) = heads_to_sequence(out, group=self.group)
        return out


def _local_positions(x: Tensor, n: int, group: dist.ProcessGroup, dim: int, what: str) -> Tensor:
    """Rows ``[r·n, (r+1)·n)`` of a per-position tensor that covers the full sequence along ``dim``."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] != n * world:
        raise ValueError(f"context parallelism: {what} has {x.shape[dim]} positions, expected {n} local "
                         f"tokens x cp {world}")
    return x.narrow(dim, rank * n, n)


def _block_pre_hook(group: dist.ProcessGroup):
    # WanBlock(x, e, context, rope): x holds this rank's tokens; the RoPE table (and a per-token
    # modulation e [B, L, 6, dim]) cover the full sequence: keep this rank's positions.
    def hook(module, args):
        x, e, context, rope, *rest = args
        n = x.shape[1]
        rope = _local_positions(rope, n, group, 0, "the RoPE table")
        if e.ndim == 4:
            e = _local_positions(e, n, group, 1, "the per-token modulation")
        return (x, e, context, rope, *rest)

    return hook


def _head_pre_hook(group: dist.ProcessGroup):
    def hook(module, args):  # WanHead(x, e): a per-token time embedding e [B, L, dim] is sliced
        x, e = args
        if e.ndim == 3:
            e = _local_positions(e, x.shape[1], group, 1, "the per-token time embedding")
        return x, e

    return hook


def _dits(model: nn.Module) -> list[WanDiT]:
    return [m for m in model.modules() if isinstance(m, WanDiT)]


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make every ``WanDiT`` inside ``model`` context-parallel over ``group`` (in place; returned).

    Every rank of ``group`` must call the model with identical inputs (and tangents); each gets the
    full output. Requirements: heads and the patch-token count L = T'·H'·W' divisible by the group
    size. A group of size 1 leaves the model unchanged."""
    dits = _dits(model)
    if not dits:
        raise ValueError(f"apply_context_parallel: no WanDiT inside {type(model).__name__}")
    world = dist.get_world_size(group)
    if world == 1:
        return model
    for dit in dits:
        if getattr(dit, "_rcm_cp_group", None) is not None:
            raise ValueError("apply_context_parallel: the model is already context-parallel")
        if dit.config.num_heads % world:
            raise ValueError(f"context parallelism: {dit.config.num_heads} heads are not divisible by cp={world}")
        dit._rcm_cp_group = group
        dit.patch_embedding.register_forward_hook(lambda m, args, out: split_sequence(out, group, dim=1))
        for block in dit.blocks:
            block.register_forward_pre_hook(_block_pre_hook(group))
            block.self_attn.attention_fn = UlyssesAttention(group, block.self_attn.attention_fn)
        dit.head.register_forward_pre_hook(_head_pre_hook(group))
        dit.head.register_forward_hook(lambda m, args, out: gather_sequence(out, group, dim=1))
    return model
