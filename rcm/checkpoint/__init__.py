"""The one checkpointer of a training run, with its backend chosen once.

    ckpt = checkpointer(run_dir / "checkpoints", mesh, keep=2)   # local files, or DCP under torchrun
    ckpt.save(state, extra)                                      # collective under DCP
    found = ckpt.load_latest(state, check)                       # (extra, path) or None

Backends: ``local`` (one process: ``step_XXXXXXXX.pt`` files holding ``state.state_dict()``) and ``dcp``
(``torch.distributed.checkpoint`` folders written by every rank, readable at any world size). Both write
under a temporary name and move a ``latest`` pointer after a complete write, keeping the newest ``keep``.
``atomic`` (crash-safe writes) imports nothing of rcm; ``export`` is the `rcm export` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from rcm import lazy_exports
from rcm.checkpoint.atomic import CheckpointError, atomic_write_bytes

# imported on first use (torch): the command configs that import this package need no torch
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(["LATEST", "list_checkpoints", "load_file", "load_latest", "save_checkpoint"], "rcm.checkpoint.local"),
})

__all__ = [
    "LATEST",
    "CheckpointError",
    "Checkpointer",
    "atomic_write_bytes",
    "checkpointer",
    "list_checkpoints",
    "load_file",
    "load_latest",
    "save_checkpoint",
]

# check(extra, path): raises when a found checkpoint belongs to another run (before its state is used).
Check = Callable[[dict, Path], None]


class Checkpointer(Protocol):
    folder: Path

    def save(self, state, extra: dict) -> Path:
        """Write ``state`` (a training loop's ``TrainState``) and ``extra`` (plain objects)."""

    def load_latest(self, state, check: Check) -> tuple[dict, Path] | None:
        """Restore the newest complete checkpoint into ``state``; its ``extra``, or None if there is none."""


class LocalCheckpointer:
    """One process: the whole state in one ``torch.save`` file per checkpoint."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def save(self, state, extra: dict) -> Path:
        from rcm.checkpoint.local import save_checkpoint

        return save_checkpoint(self.folder, state.iteration, {"train": state.state_dict(), **extra}, keep=self.keep)

    def load_latest(self, state, check: Check) -> tuple[dict, Path] | None:
        from rcm.checkpoint.local import load_latest

        found = load_latest(self.folder)
        if found is None:
            return None
        saved, path = found
        extra = {k: v for k, v in saved.items() if k != "train"}
        check(extra, path)  # before loading: another run's tensors may not even fit this state
        state.load_state_dict(saved["train"])
        return extra, path


class DCPCheckpointer:
    """Under torchrun: every rank writes its shards (collective); any world size reads them back."""

    def __init__(self, folder: Path, mesh, keep: int = 2):
        self.folder, self.mesh, self.keep = Path(folder), mesh, keep

    def save(self, state, extra: dict) -> Path:
        from rcm.checkpoint.dcp import save_sharded_checkpoint

        return save_sharded_checkpoint(self.folder, state, self.mesh, extra=extra, keep=self.keep)

    def load_latest(self, state, check: Check) -> tuple[dict, Path] | None:
        from rcm.checkpoint.dcp import load_latest_sharded_checkpoint

        found = load_latest_sharded_checkpoint(self.folder, state, self.mesh)
        if found is None:
            return None
        extra, path = found
        if extra is None:  # a data-parallel rank that did not exist when saving: rank 0 checks the run
            return {}, path
        check(extra, path)
        return extra, path


def checkpointer(folder: str | Path, mesh: Any = None, keep: int = 2) -> Checkpointer:
    """The run's checkpointer: DCP when ``mesh`` (a ``rcm.parallel.ParallelMesh``) is given, else local."""
    return LocalCheckpointer(Path(folder), keep) if mesh is None else DCPCheckpointer(Path(folder), mesh, keep)
