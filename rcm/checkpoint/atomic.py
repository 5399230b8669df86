"""Crash-safe file writes: write to a temporary name, flush, fsync, rename, fsync the folder.

The lowest module of the checkpoint package: it imports nothing of rcm, so any module (data writers,
the training loop, exporters) can use it without an import circle."""

from __future__ import annotations

import os
from pathlib import Path


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


