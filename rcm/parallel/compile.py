"""Regional ``torch.compile``: each DiT block compiled on its own, from outside the model.

All blocks of a DiT share one forward, so Dynamo traces and inductor compiles one block graph per variant
(grad or no grad, trainable parameters or frozen, activation-checkpointed or not) and reuses it for every
layer and every network of the same architecture: minutes of compilation for a 30-layer model become
seconds, where compiling the whole model unrolls all 30 layers into each graph. The embeddings, head and
the TrigFlow wrapper around them stay eager (a few small kernels per call).

Inside a ``torch.func`` transform (the sCM JVP pass) a block runs eagerly: Dynamo cannot start a frame on
functorch-wrapped tensors, and its fallback marks the block's code as skipped for good, which would turn
off compilation everywhere. (Compiling the whole JVP function does work, tangents included, but unrolls
every layer: many minutes of compilation for 1.3B.) Apply after activation checkpointing: the compiled
call then wraps the checkpointed forward.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from rcm.models.wan import WanDiT

__all__ = ["compile_blocks"]


def compile_blocks(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """Compile every block of every ``WanDiT`` inside ``model`` (in place; returned; idempotent)."""
    dits = [m for m in model.modules() if isinstance(m, WanDiT)]
    if not dits:
        raise ValueError(f"compile_blocks: no WanDiT inside {type(model).__name__}")
    for dit in dits:
        for block in dit.blocks:
            if getattr(block, "_rcm_compiled", None) != backend:
                block._rcm_eager_forward = block.forward  # the class's or activation checkpointing's
                block._rcm_compiled_forward = torch.compile(block._rcm_eager_forward, backend=backend)
                block.forward = types.MethodType(_compiled_or_eager_forward, block)
                block._rcm_compiled = backend
    return model


def _compiled_or_eager_forward(self, *args, **kwargs):
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside torch.func.jvp / vmap / grad
        return self._rcm_eager_forward(*args, **kwargs)
    return self._rcm_compiled_forward(*args, **kwargs)
