"""Activation checkpointing per DiT block (non-reentrant ``torch.utils.checkpoint``), from outside.

Each block's forward is replaced on the instance by one that runs the class's forward under
``checkpoint(..., use_reentrant=False)``: only the block inputs are kept, the rest is recomputed in the
backward pass. Module names, parameters and state-dict keys do not change (no wrapper module), so
FSDP, context parallelism, EMA updates and checkpoints see the same model.

When gradients are off (teacher forwards, the sCM no-grad JVP pass, rollouts) nothing would be saved,
so the block runs directly; so it does inside ``torch.func`` transforms (torch 2.11's checkpoint fails under
``torch.func.jvp`` with gradients on).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rcm.models.wan import WanDiT

__all__ = ["apply_activation_checkpointing"]


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward  # the class's forward; the instance attribute shadows it
    # Inside a torch.func transform the block runs directly: torch 2.11's non-reentrant checkpoint has no
    # forward-AD rule there (its input-saving autograd.Function raises under torch.func.jvp with grad on; seen on
    # 2 H200s), and a transform's own saved state is not what checkpointing is for.
    # Under torch.compile the interpreter stack reads as non-empty even outside any transform (Dynamo's own
    # functorch state), which silently dropped checkpointing from compiled blocks: 2.2x the eager step's peak
    # memory on an H200 (docs/design.md). Compiled blocks only run outside transforms (compile_blocks sends a
    # transform's call to the eager forward), so under compile the check is skipped.
    if torch.is_grad_enabled() and (torch.compiler.is_compiling()
                                    or torch._C._functorch.peek_interpreter_stack() is None):
        return checkpoint(forward, self, *args, use_reentrant=False, **kwargs)
    return forward(self, *args, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block of every ``WanDiT`` inside ``model`` (in place; returned; idempotent).

    Apply before ``fully_shard`` (``parallelize`` does): FSDP's hooks then gather a block's
    parameters around both the forward and the recomputation."""
    dits = [m for m in model.modules() if isinstance(m, WanDiT)]
    if not dits:
        raise ValueError(f"apply_activation_checkpointing: no WanDiT inside {type(model).__name__}")
    for dit in dits:
        for block in dit.blocks:
            if not getattr(block, "_rcm_activation_checkpointing", False):
                # A bound method (not a closure): deepcopy rebinds it to the copy.
                block.forward = types.MethodType(_checkpointed_forward, block)
                block._rcm_activation_checkpointing = True
    return model
