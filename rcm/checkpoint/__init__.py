"""Crash-safe training checkpoints: atomic writes, a `latest` pointer moved only after a complete write,
the last N kept.

Layout of a run folder:
    checkpoints/step_00000120.pt     one file per checkpoint (torch.save of the whole train state)
    checkpoints/latest               the file name of the newest complete checkpoint
A checkpoint is written to a temporary name, flushed and fsynced, then renamed: a crash mid-write leaves
at worst a stray temporary file, never a half-written checkpoint under a real name, and `latest` keeps
pointing to the previous good one.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

LATEST = "latest"
_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message says which and why."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: leave no partial temporary file behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` in `folder`, point `latest` at it, prune to the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(folder / LATEST, path.name.encode())
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stray in folder.glob(".*.tmp*"):  # leftovers of writes killed mid-way
        stray.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:  # weights_only: tensors and plain containers only, so a checkpoint can never run code when loaded
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a train state (a dict), got {type(state).__name__}")
    return state


def load_latest(folder: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in `folder` (following `latest`), or None if the folder has none."""
    folder = Path(folder)
    pointer = folder / LATEST
    candidates = list_checkpoints(folder)
    if pointer.is_file():
        named = folder / pointer.read_text().strip()
        if named in candidates:  # prefer the pointer; anything newer was never completed
            candidates = candidates[: candidates.index(named) + 1]
    if not candidates:
        return None
    errors = []
    for path in reversed(candidates):
        try:
            return load_file(path, map_location), path
        except CheckpointError as e:
            errors.append(str(e))
    raise CheckpointError(f"no readable checkpoint in {folder}: " + "; ".join(errors))


# ----------------------------------------------------------------------------------------------------------
# `rcm export`: one network of a training checkpoint as a file `rcm sample` loads


@dataclass
class ExportConfig:
    """Export one network of a training checkpoint as a single safetensors file for `rcm sample --model wan`.

    Takes a run's checkpoints/ folder (its latest complete checkpoint), one DCP step folder (written by any
    number of torchrun ranks; read in this one process) or one single-process step_XXXXXXXX.pt file."""

    checkpoint: Path
    """the checkpoint: a run's checkpoints/ folder, a DCP step folder, or a step_XXXXXXXX.pt file."""
    out: Path = Path("student_ema.safetensors")
    """the safetensors file to write."""
    model: Literal["ema", "student", "fake_score"] = "ema"
    """which network: the EMA student (what rCM releases), the live student, or the fake score."""
    dtype: Literal["bfloat16", "float32", "keep"] = "bfloat16"
    """dtype of the written weights (keep: as stored)."""


def _newest(folder: Path) -> Path:
    """The checkpoint `latest` names in a run's checkpoints/ folder, else the newest complete one."""
    from rcm.parallel import list_sharded_checkpoints

    found = sorted(list_checkpoints(folder) + list_sharded_checkpoints(folder), key=lambda p: p.name)
    pointer = folder / LATEST
    if pointer.is_file():
        named = [p for p in found if p.name == pointer.read_text().strip()]
        if named:
            return named[0]
    if not found:
        raise CheckpointError(f"--checkpoint: {folder} holds no complete checkpoint (step_XXXXXXXX.pt or DCP folder)")
    return found[-1]


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.model``'s weights from ``cfg.checkpoint`` to ``cfg.out`` (atomically); returns the path."""
    from safetensors.torch import save

    from rcm.parallel import read_checkpoint_model

    path = Path(cfg.checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint: no such file or folder: {path}")
    if path.is_dir() and not (path / ".metadata").is_file():
        path = _newest(path)
    if path.is_dir():  # DCP: read in this process, whatever world size wrote it
        weights = read_checkpoint_model(path, cfg.model)
    else:
        train = load_file(path).get("train")
        if not isinstance(train, dict) or train.get(cfg.model) is None:
            raise CheckpointError(f"--checkpoint: {path} holds no {cfg.model!r} network")
        weights = train[cfg.model]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "keep": None}[cfg.dtype]
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
               for k, v in weights.items()}
    kind = "teacher" if cfg.model == "fake_score" else "student"  # a fake score samples like a teacher (a denoiser)
    data = save(weights, metadata={"kind": kind, "source": str(path), "network": cfg.model})
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(cfg.out), data)
    print(f"{cfg.model} of {path} → {cfg.out} ({sum(v.numel() for v in weights.values()) / 1e6:,.1f}M parameters)")
    return Path(cfg.out)
