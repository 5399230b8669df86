"""DTensor sharding rules for the attention ops: attention is independent per batch element and per head.

Accepted placements on each mesh dim: all replicated, all sharded on batch (dim 0), or all sharded on heads
(dim 2 of [B, L, H, D]; dim 1 of lse [B, H, L]). The sequence dim is never sharded here: context
parallelism swaps sequence for head sharding with all-to-alls before calling the op (rcm.parallel).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

_BATCH = (Shard(0), Shard(0))  # ([B, L, H, D], lse [B, H, L])
_HEADS = (Shard(2), Shard(1))
_REPLICATE = (Replicate(), Replicate())


def _placements(tensors, kinds, rule):
    """Placement for each arg: None for non-tensors / absent optionals, else the rule's layout or lse placement."""
    out = []
    for x, kind in zip(tensors, kinds):
        if kind is None or x is None:
            out.append(None)
        else:
            out.append(rule[1] if kind == "lse" else rule[0])
    return out


@register_sharding(torch.ops.rcm.attention_forward.default)
def _forward_sharding(q, k, v, scale, backend):
    args, kinds = (q, k, v, scale, backend), ("x", "x", "x", None, None)
    return [([r[0], r[1]], _placements(args, kinds, r)) for r in (_REPLICATE, _BATCH, _HEADS)]


@register_sharding(torch.ops.rcm.attention_forward_jvp.default)
def _forward_jvp_sharding(q, k, v, q_dot, k_dot, v_dot, scale, backend):
    args = (q, k, v, q_dot, k_dot, v_dot, scale, backend)
    kinds = ("x",) * 6 + (None, None)
    return [([r[0], r[0], r[1]], _placements(args, kinds, r)) for r in (_REPLICATE, _BATCH, _HEADS)]


@register_sharding(torch.ops.rcm.attention_backward.default)
def _backward_sharding(grad_out, q, k, v, out, lse, scale, backend):
    args = (grad_out, q, k, v, out, lse, scale, backend)
    kinds = ("x",) * 5 + ("lse", None, None)
    return [([r[0]] * 3, _placements(args, kinds, r)) for r in (_REPLICATE, _BATCH, _HEADS)]
