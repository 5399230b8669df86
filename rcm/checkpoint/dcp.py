"""Sharded train-state checkpoints with ``torch.distributed.checkpoint`` (DCP), and safetensors export.

A checkpoint is a DCP folder holding, as one nested state dict:

    student, fake_score, ema              model state dicts (``get_state_dict``: FQN keys = the
                                          model's own keys, DTensor shards written by their owners)
    student_optimizer, critic_optimizer   optimizer state dicts keyed by parameter FQN
    student_scheduler, critic_scheduler   scheduler state dicts (small objects)
    progress                              iteration, nonfinite_in_a_row, skipped_steps
    ranks                                 per data-parallel rank: generator and torch RNG states and
                                          an optional ``extra`` object (e.g. the data position)

DCP stores every tensor with its global shape, so a checkpoint written by N processes loads on M
processes, sharded or not (``load_train_state`` works without a process group too). The teacher is
not saved: it is the frozen input of the run.

Random streams across a world-size change: data-parallel rank d restores the saved stream of rank d;
a rank that did not exist gets a fresh stream derived deterministically from saved rank 0's. CP ranks
of a group share their data-parallel rank's stream (``rank_seed``).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from rcm.checkpoint.atomic import (CheckpointError, atomic_write_bytes, atomic_write_with, remove_dead_temporaries,
                                   temporary_path)
from rcm.checkpoint.local import LATEST, CheckpointWarning
from rcm.checkpoint.manifest import discard_manifest, newest_intact, write_manifest
from rcm.parallel.fsdp import full_model_state_dict
from rcm.parallel.mesh import ParallelMesh

__all__ = [
    "export_checkpoint",
    "export_safetensors",
    "list_sharded_checkpoints",
    "load_latest_sharded_checkpoint",
    "load_train_state",
    "read_checkpoint_extra",
    "save_sharded_checkpoint",
    "save_train_state",
]

_PROGRESS = ("iteration", "nonfinite_in_a_row", "skipped_steps")


def _ranks(mesh: ParallelMesh | None) -> tuple[int, int]:
    return (0, 0) if mesh is None else (mesh.dp_rank, mesh.cp_rank)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _state_dict(state, optimizers: tuple[bool, bool]) -> dict[str, Any]:
    """The nested state dict of a TrainState (models and optimizers through get_state_dict).

    ``optimizers``: whether to include the student / critic optimizer. An optimizer that has never
    stepped is left out: get_state_dict would initialize it (a zero-lr step: Adam's step count 1),
    and a resumed run would then differ from an uninterrupted one."""
    sd: dict[str, Any] = {}
    with_student, with_critic = optimizers
    if with_student:
        sd["student"], sd["student_optimizer"] = get_state_dict(state.student, state.student_optimizer)
    else:
        sd["student"] = get_model_state_dict(state.student)
    if state.fake_score is not None:
        if with_critic:
            sd["fake_score"], sd["critic_optimizer"] = get_state_dict(state.fake_score, state.critic_optimizer)
        else:
            sd["fake_score"] = get_model_state_dict(state.fake_score)
        sd["critic_scheduler"] = state.critic_scheduler.state_dict()
    sd["ema"] = get_model_state_dict(state.ema)
    sd["student_scheduler"] = state.student_scheduler.state_dict()
    sd["progress"] = {k: int(getattr(state, k)) for k in _PROGRESS}
    return sd


def _stepped(optimizer) -> bool:
    return optimizer is not None and len(optimizer.state) > 0


def _gather_rank_states(payload: dict, mesh: ParallelMesh | None) -> dict[int, dict]:
    """{dp_rank: payload} from CP rank 0 of every group, the same dict on every rank."""
    dp_rank, cp_rank = _ranks(mesh)
    entries = [(dp_rank, cp_rank, payload)]
    if _distributed() and dist.get_world_size() > 1:
        entries = [None] * dist.get_world_size()
        dist.all_gather_object(entries, (dp_rank, cp_rank, payload))
    return {d: p for d, c, p in entries if c == 0}


def save_train_state(path: str | Path, state, mesh: ParallelMesh | None = None, extra: Any = None) -> Path:
    """Write ``state`` (a ``TrainState`` of the training loop, sharded or not) as a DCP checkpoint folder.

    Collective: every rank calls it. ``extra``: any picklable per-rank object stored per data-parallel
    rank (e.g. ``task.state_dict()``), returned by ``load_train_state``."""
    path = Path(path)
    sd = _state_dict(state, (_stepped(state.student_optimizer), _stepped(state.critic_optimizer)))
    payload = {"generator": state.generator.get_state(), "torch_rng": torch.get_rng_state(), "extra": extra}
    # One opaque object (identical on every rank): DCP stores it once, whatever the world size.
    sd["ranks"] = _to_bytes({"dp_size": 1 if mesh is None else mesh.dp_size,
                             "states": _gather_rank_states(payload, mesh)})
    dcp.save(sd, checkpoint_id=str(path))
    return path


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _derived_generator_state(saved: torch.Tensor, index: int, device) -> torch.Tensor:
    g = torch.Generator().set_state(saved)
    seed = int(torch.randint(0, 2**62, (index + 1,), generator=g)[index])
    return torch.Generator(device=device).manual_seed(seed).get_state()


def load_train_state(path: str | Path, state, mesh: ParallelMesh | None = None) -> Any:
    """Load a ``save_train_state`` folder into ``state`` (in place), whatever the world size that
    wrote it. Collective. Returns this rank's saved ``extra`` (None for a data-parallel rank that
    did not exist when saving)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a DCP checkpoint folder (no .metadata)")
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    saved_opt = tuple(any(k.startswith(f"{name}.") for k in keys)
                      for name in ("student_optimizer", "critic_optimizer"))
    sd = _state_dict(state, saved_opt)
    sd["ranks"] = b""
    dcp.load(sd, checkpoint_id=str(path))
    models = (("student", state.student, state.student_optimizer, state.student_scheduler, saved_opt[0]),
              ("fake_score", state.fake_score, state.critic_optimizer, state.critic_scheduler, saved_opt[1]))
    for name, model, optimizer, scheduler, with_optimizer in models:
        if model is None:
            continue
        if with_optimizer:
            opt_name = "student_optimizer" if name == "student" else "critic_optimizer"
            set_state_dict(model, optimizer, model_state_dict=sd[name], optim_state_dict=sd[opt_name])
        else:
            set_model_state_dict(model, sd[name])
            optimizer.state.clear()  # never stepped when saved: fresh again
        scheduler.load_state_dict(sd["student_scheduler" if name == "student" else "critic_scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # what a saved optimizer's param_groups would hold
    set_model_state_dict(state.ema, sd["ema"])
    for k in _PROGRESS:
        setattr(state, k, int(sd["progress"][k]))

    saved = _from_bytes(sd["ranks"])["states"]
    dp_rank, _ = _ranks(mesh)
    mine = saved.get(dp_rank)
    if mine is not None:
        state.generator.set_state(mine["generator"])
        torch.set_rng_state(mine["torch_rng"])
        return mine["extra"]
    first = saved[min(saved)]
    state.generator.set_state(_derived_generator_state(first["generator"], dp_rank, state.generator.device))
    torch.set_rng_state(_derived_generator_state(first["torch_rng"], dp_rank, "cpu"))
    return None


# ------------------------------------------------------------------------------------------------
# A run's checkpoint folder: step_XXXXXXXX/ DCP folders, the ``latest`` pointer, the last N kept.

_STEP = re.compile(r"^step_(\d{8})$")


def list_sharded_checkpoints(folder: str | Path) -> list[Path]:
    """Complete DCP checkpoints of a run folder, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP.match(p.name) and (p / ".metadata").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_sharded_checkpoint(folder: str | Path, state, mesh: ParallelMesh | None = None, extra: Any = None,
                            keep: int = 2) -> Path:
    """``save_train_state`` into ``folder/step_<iteration>/``, crash-safe like the local backend (``rcm.checkpoint.local``):
    written under a temporary name, renamed by rank 0 once complete, then ``latest`` is moved and
    checkpoints beyond the newest ``keep`` are deleted. Collective; returns the final path."""
    folder = Path(folder)
    name = f"step_{state.iteration:08d}"
    rank0 = not _distributed() or dist.get_rank() == 0
    # one temporary name for every rank (rank 0's, unique to its process): a cleanup by name pattern can tell
    # a live save's folder from a killed one's
    shared = [temporary_path(folder / name) if rank0 else None]
    if _distributed() and dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    tmp = Path(shared[0])
    if rank0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(folder)  # leftovers of saves killed mid-way; never a live process's
    _barrier()
    save_train_state(tmp, state, mesh, extra)
    _barrier()
    final = folder / name
    if rank0:
        shutil.rmtree(final, ignore_errors=True)
        discard_manifest(final)
        os.replace(tmp, final)
        write_manifest(final)  # before the pointer moves: a folder with a manifest is complete
        atomic_write_bytes(folder / LATEST, name.encode())
        for old in list_sharded_checkpoints(folder)[:-keep] if keep > 0 else []:
            discard_manifest(old)
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_latest_sharded_checkpoint(folder: str | Path, state, mesh: ParallelMesh | None = None):
    """Load the newest complete checkpoint of ``folder`` (following ``latest``) into ``state``.
    Returns ``(extra, path)``, or None when the folder has none. Collective."""
    folder = Path(folder)
    candidates = list_sharded_checkpoints(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in candidates:  # anything newer than the pointer was never completed
            candidates = candidates[: candidates.index(named) + 1]
    if not candidates:
        return None
    chosen = [None]
    if not _distributed() or dist.get_rank() == 0:  # rank 0 reads the checksums; every rank follows its choice
        good, corrupt = newest_intact(candidates)
        for bad in corrupt:
            warnings.warn(f"{bad.message}; falling back to an older checkpoint", CheckpointWarning, stacklevel=2)
        chosen = [None if good is None else str(good.path)]
    if _distributed() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        raise CheckpointError(f"no intact checkpoint in {folder}")
    path = Path(chosen[0])
    return load_train_state(path, state, mesh), path


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()  # no shared storage in a safetensors file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: save_file(out, str(tmp)))
    return path


def export_safetensors(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Write the whole (possibly sharded) model to one safetensors file, from rank 0. Collective.
    Returns the path on the writing rank, None elsewhere."""
    full = full_model_state_dict(model)
    if _distributed() and dist.get_rank() != 0:
        return None
    return _save_safetensors(full, Path(path), dtype)


def export_checkpoint(checkpoint: str | Path, path: str | Path, model: str = "ema",
                      dtype: torch.dtype | None = None) -> Path:
    """Convert one model (``"ema"``, ``"student"`` or ``"fake_score"``) of a ``save_train_state``
    folder into a single safetensors file, in one process without any process group (any world size
    wrote it). The keys are the model's own: a ``WanDiT``'s load with ``load_state_dict(strict=True)``."""
    return _save_safetensors(read_checkpoint_model(checkpoint, model), Path(path), dtype)


def read_checkpoint_model(checkpoint: str | Path, model: str = "ema") -> dict[str, torch.Tensor]:
    """One model's full weights (CPU tensors, the model's own keys) from a ``save_train_state`` folder,
    read in this process without any process group, whatever world size wrote it."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a DCP checkpoint folder (no .metadata)")
    meta = FileSystemReader(str(checkpoint)).read_metadata()
    prefix = model + "."
    empty = {}
    for key, item in meta.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(item, "properties"):  # tensors of that model
            empty[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not empty:
        models = sorted({k.split(".", 1)[0] for k in meta.state_dict_metadata})
        raise ValueError(f"{checkpoint} has no tensors of model {model!r}; top-level entries: {models}")
    dcp.load(empty, checkpoint_id=str(checkpoint), no_dist=True)
    return {k[len(prefix):]: v for k, v in empty.items()}


def read_checkpoint_extra(checkpoint: str | Path) -> Any:
    """The ``extra`` object of a ``save_train_state`` folder (data-parallel rank 0's), read in this process
    without any process group and without reading any tensor; None when it holds none."""
    sd = {"ranks": b""}
    dcp.load(sd, checkpoint_id=str(checkpoint), no_dist=True)
    states = _from_bytes(sd["ranks"])["states"]
    return states[min(states)]["extra"] if states else None
