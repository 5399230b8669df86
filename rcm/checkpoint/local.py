"""One-process training checkpoints (the local backend): atomic writes, a `latest` pointer moved only after a complete write,
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
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from rcm.checkpoint.atomic import CheckpointError, atomic_write_bytes, remove_dead_temporaries
from rcm.checkpoint.manifest import discard_manifest, newest_intact, write_manifest

LATEST = "latest"

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as checkpoint `step` in `folder`, point `latest` at it, prune to the newest `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    discard_manifest(path)  # an older checkpoint of this name (a resumed run) loses its manifest first
    atomic_write_bytes(path, buffer.getvalue())
    write_manifest(path)  # last but the pointer: a checkpoint with a manifest was written completely
    atomic_write_bytes(folder / LATEST, path.name.encode())
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        discard_manifest(old)
        old.unlink(missing_ok=True)
    remove_dead_temporaries(folder)  # ours and dead processes'; never a live process's write in progress
    return path


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def load_file(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A single-process checkpoint file; ``mmap``: its tensors memory-mapped, read only where used."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:  # weights_only: tensors and plain containers only, so a checkpoint can never run code when loaded
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
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
    while candidates:
        # checksums first: a checkpoint with flipped bytes can still unpickle into wrong numbers
        good, corrupt = newest_intact(candidates)
        errors += [bad.message for bad in corrupt]
        if good is None:
            break
        try:
            saved = load_file(good.path, map_location)
        except CheckpointError as e:  # unreadable though unverified (an older run without manifests)
            errors.append(str(e))
            candidates = candidates[: candidates.index(good.path)]
            continue
        for message in errors:  # the run goes on from an older checkpoint: say which were passed over
            warnings.warn(f"{message}; resuming from {good.path.name}", CheckpointWarning, stacklevel=2)
        return saved, good.path
    raise CheckpointError(f"no readable checkpoint in {folder}: " + "; ".join(errors))


class CheckpointWarning(UserWarning):
    """A checkpoint passed over on resume (corrupt or unreadable); the run continues from an older one."""

