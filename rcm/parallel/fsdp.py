"""``parallelize(model, mesh, cfg)``: context parallelism, activation checkpointing and FSDP2, from outside.

    parallelize = apply_context_parallel (cp > 1) → apply_activation_checkpointing (if asked)
                  → fully_shard(block) for every DiT block → fully_shard(model)

The same call serves the student, the teacher, the fake score and the EMA (four separately sharded
models, as the reference). Mixed precision on CUDA: parameters all-gathered in bf16 for compute,
gradients reduced in fp32, fp32 sharded master weights; on CPU everything stays fp32. FSDP must not
cast the forward inputs (``cast_forward_inputs=False``): the DiT takes its timestep in fp32 and its
blocks take the fp32 modulation and RoPE table; only the network itself decides what runs in bf16.

Gradient reduction: the mean over data-parallel ranks and the **sum** over the CP ranks of a group
(each holds its own tokens' share of the gradient), i.e. divide factor = dp size.

JVP through FSDP2 (docs/design.md fact 5): FSDP2 all-gathers into plain tensors in a module pre-forward
hook, so ``torch.func.jvp`` over the sharded model never sees a DTensor; tested with and without
``torch.no_grad()`` (tangents equal the single-process run), followed by normal grad passes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rcm.models.wan import WanDiT
from rcm.parallel.activation_checkpoint import apply_activation_checkpointing
from rcm.parallel.context_parallel import apply_context_parallel
from rcm.parallel.config import ParallelConfig
from rcm.parallel.mesh import ParallelMesh

__all__ = ["gathered_first_term", "gathered_for_jvp", "grads_finite", "mixed_precision_policy", "parallelize", "shard_train_state"]


def mixed_precision_policy(cfg: ParallelConfig, device_type: str) -> MixedPrecisionPolicy:
    """bf16 compute / fp32 reduce on CUDA ("auto"), fp32 on CPU; never casts forward inputs."""
    return MixedPrecisionPolicy(param_dtype=cfg.compute_dtype(device_type), reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def parallelize(model: nn.Module, mesh: ParallelMesh, cfg: ParallelConfig | None = None) -> nn.Module:
    """Shard ``model`` (a ``WanDiT`` or a module containing one) over ``mesh``; in place, returned.

    ``cfg`` defaults to ``mesh.config``. Call before building the model's optimizer (FSDP replaces
    the parameters by DTensor shards), or use ``shard_train_state`` for a whole ``TrainState``.
    """
    cfg = mesh.config if cfg is None else cfg
    dits = [m for m in model.modules() if isinstance(m, WanDiT)]
    if not dits:
        raise ValueError(f"parallelize: no WanDiT inside {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("parallelize: the model is already sharded")
    if mesh.cp_size > 1:
        apply_context_parallel(model, mesh.cp_group)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    policy = mixed_precision_policy(cfg, mesh.device_type)
    for dit in dits:
        for block in dit.blocks:
            fully_shard(block, mesh=mesh.fsdp, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
            block._rcm_reshard_after_forward = cfg.reshard_after_forward
    # The root unit holds the embeddings and the head (small). It reshards after forward too: a
    # no-grad forward (teacher, JVP pass, rollouts) is never followed by a backward that would free it.
    fully_shard(model, mesh=mesh.fsdp, mp_policy=policy, reshard_after_forward=True)
    if mesh.cp_size > 1:
        # Sum over the CP ranks, mean over data-parallel ranks. NCCL applies the factor inside the
        # reduce-scatter (PREMUL_SUM); gloo has no PREMUL_SUM: plain sums with a separate scaling.
        force_sum = dist.get_backend(mesh.fsdp.get_group(mesh.fsdp.ndim - 1)) != "nccl"
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(float(mesh.dp_size))
                if force_sum:
                    module.set_force_sum_reduction_for_comms(True)
    return model


@contextmanager
def gathered_for_jvp(*models: nn.Module):
    """All-gather every FSDP unit of ``models`` now (outside any ``torch.func`` transform) and keep
    the parameters gathered until the block exits: FSDP's hooks inside a ``torch.func.jvp`` then find
    them ready and do no collective of their own. A backward inside the block reshards as usual;
    whatever is still gathered at the exit is resharded then.

    Needed on torch 2.11 + CUDA, where FSDP2's all-gather inside ``torch.func.jvp`` fails
    (``NotImplementedError: Cannot access storage of TensorWrapper``); harmless elsewhere. Memory: the
    whole model's compute-dtype parameters are resident for the duration (ZeRO-2-like)."""
    units = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(getattr(unit, "_rcm_reshard_after_forward", True), recurse=False)
            unit.reshard()


def gathered_first_term(terms: Iterator, *models: nn.Module) -> Iterator:
    """Wrap the ``rcm.losses.student_losses`` generator so its first term (sCM: the JVP pass and the
    student's grad forward) is produced inside ``gathered_for_jvp(*models)`` and the block stays open
    while the caller backpropagates it; later terms (DMD) run with ordinary FSDP. Drop-in::

        terms = gathered_first_term(student_losses(student, ...), student)
        for name, per_sample, diagnostics in terms: ...   # backward inside the loop body, as now
    """
    with gathered_for_jvp(*models):
        first = next(terms, None)
        if first is None:
            return
        yield first
    yield from terms


def shard_train_state(state, mesh: ParallelMesh, cfg: ParallelConfig | None = None):
    """``parallelize`` the student, teacher, fake score and EMA of a fresh ``rcm.train.TrainState``
    (as ``init_state`` builds it, before any optimizer step) and point its optimizers at the new
    sharded parameters (same order, same hyperparameters; the schedulers keep their optimizers).
    In place; returns ``state``."""
    for name, optimizer in (("student", state.student_optimizer), ("fake_score", state.critic_optimizer)):
        if optimizer is not None and len(optimizer.state):
            raise ValueError(f"shard_train_state: the {name} optimizer has already stepped; shard first")
    for model_name, optimizer in (("student", state.student_optimizer), ("teacher", None),
                                  ("fake_score", state.critic_optimizer), ("ema", None)):
        model = getattr(state, model_name)
        if model is None:
            continue
        before = list(model.parameters())
        parallelize(model, mesh, cfg)
        after = list(model.parameters())
        if optimizer is not None:
            _repoint(optimizer, dict(zip(map(id, before), after)), model_name)
    return state


def materialize_train_state(state, weights: dict[str, torch.Tensor] | None, device: torch.device):
    """Allocate the sharded meta-device models of ``state`` (from ``init_state`` on a meta teacher, then
    ``shard_train_state``) on ``device`` and fill each (student, teacher, fake score, EMA) with the full
    teacher ``weights``, given on rank 0 only (``None`` elsewhere) and broadcast into every rank's shards.
    The optimizers keep their parameters (allocation swaps the tensors inside them). Collective."""

    for name in ("student", "teacher", "fake_score", "ema"):
        model = getattr(state, name)
        if model is None:
            continue
        model.to_empty(device=device)
        # a fresh dict each time: the broadcast replaces the entries it is given by this rank's shards
        load_full_model_state_dict(model, None if weights is None else dict(weights), broadcast_from_rank0=True)
    return state


def _repoint(optimizer: torch.optim.Optimizer, new: dict[int, nn.Parameter], name: str) -> None:
    for group in optimizer.param_groups:
        try:
            group["params"] = [new[id(p)] for p in group["params"]]
        except KeyError:
            raise ValueError(f"shard_train_state: the {name} optimizer holds parameters that are not "
                             f"the {name} model's") from None


def grads_finite(module: nn.Module) -> bool:
    """True when every gradient of ``module`` is finite on every rank (one all-reduce; the same
    answer everywhere, so all ranks skip or take a step together). Works for sharded (DTensor)
    and plain gradients, with or without an initialized process group."""
    flags = []
    for p in module.parameters():
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if isinstance(g, DTensor) else g
        flags.append(torch.isfinite(local).all())
    ok = torch.stack(flags).all().to(torch.int32).cpu() if flags else torch.ones((), dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            ok = ok.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


# ------------------------------------------------------------------------------------------------
# Full (unsharded) weights: for sampling, export and loading a teacher into a sharded model.


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors. Collective for a sharded model, and then only
    rank 0 gets them (the others get ``{}``). Keys are the model's own (official Wan keys)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state_dict(model: nn.Module, full: dict[str, torch.Tensor] | None, *, strict: bool = True,
                               broadcast_from_rank0: bool = False) -> None:
    """Load plain full weights (e.g. the teacher checkpoint) into a sharded or plain model; each rank
    keeps its shards. Strict by default (no silent key mismatches, docs/design.md).

    ``broadcast_from_rank0``: only rank 0 reads the file and passes ``full``; the others pass ``None``
    and receive the tensors through the process group (one copy of a 14B model in host memory per
    node instead of one per GPU). With a model built on the meta device, call
    ``model.to_empty(device=...)`` after ``parallelize`` and before this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=strict, broadcast_from_rank0=broadcast_from_rank0)
    set_model_state_dict(model, {} if full is None else full, options=opts)
