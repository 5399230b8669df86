"""Content fingerprints of large files (a teacher of many GB): streamed sha256, cached in a user cache folder.

Guarantees:
- ``file_digest(path)`` is the sha256 of the file's bytes, read in 1 MiB chunks (memory does not grow with
  the file). The same content has the same digest under any name (a copy, a link, a path through ``..``).
- The cache lives in ``user_cache_dir()`` (``$XDG_CACHE_HOME/rcm`` when that is an absolute path, else
  ``~/.cache/rcm``), never beside the file or inside the installed package. One small JSON entry per file
  version, written atomically under a per-process temporary name, so concurrent runs cannot corrupt it; an
  unreadable or inconsistent entry is ignored and rewritten; a cache that cannot be written is skipped.
- An entry is keyed by (resolved path, device, inode, size, mtime_ns, ctime_ns). ctime cannot be set by
  ``os.utime``, and any write or rename of the file changes it, so content replaced in place with its size and
  mtime restored, or a new file renamed over the old one, is hashed again. Entries are written only for files
  whose mtime and ctime are at least ``RACY_WINDOW_S`` older than the read, so two writes inside one tick of
  a coarse filesystem clock cannot hide behind an unchanged timestamp; a file that changes while it is being
  read raises a ``ValueError`` naming it.

Not guaranteed: changes made with the system clock set back to the old ctime, or by writing the block device
underneath the filesystem, keep the old digest until the file's key changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from rcm.checkpoint.atomic import atomic_write_bytes

CHUNK_BYTES = 1 << 20
RACY_WINDOW_S = 2.0


def user_cache_dir() -> Path:
    """rcm's per-user cache folder: ``$XDG_CACHE_HOME/rcm`` if that is set to an absolute path, else ``~/.cache/rcm``.
    Not created here."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return base / "rcm"


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of ``path``'s bytes, streamed in 1 MiB chunks; no cache."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _key(resolved: Path, stat: os.stat_result) -> dict:
    return {"path": str(resolved), "dev": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}


def _entry_path(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]
    return user_cache_dir() / "digests" / f"{name}.json"


def _cached(entry: Path, key: dict) -> str | None:
    try:
        record = json.loads(entry.read_text())
    except (OSError, ValueError):  # absent, or corrupt: hash again and rewrite it
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    digest = record.get("sha256")
    if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


def file_digest(path: str | Path, cache: bool = True) -> str:
    """The hex sha256 of the file at ``path``, from the user cache when its key is unchanged (see the module notes)."""
    path = Path(path)
    try:
        resolved = path.resolve(strict=True)
        before = os.stat(resolved)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    if not resolved.is_file():
        raise ValueError(f"{path} is not a file")
    key = _key(resolved, before)
    entry = _entry_path(key)
    if cache and (digest := _cached(entry, key)) is not None:
        return digest
    started = time.time_ns()
    digest = sha256_file(resolved)
    if _key(resolved, os.stat(resolved)) != key:
        raise ValueError(f"{path} changed while it was being read; run again once it is no longer being written")
    newest_ns = max(before.st_mtime_ns, before.st_ctime_ns)
    if cache and started - newest_ns >= RACY_WINDOW_S * 1e9:
        record = {"key": key, "sha256": digest}
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(entry, json.dumps(record).encode())
        except OSError:  # a read-only or full home: the digest is right, only slower next time
            pass
    return digest


def path_digest(path: str | Path, cache: bool = True) -> str:
    """``file_digest`` of a file; of a folder (a model saved as several files), the sha256 of its sorted
    relative file names and their digests. Hidden files and folders (names starting with '.') are left out."""
    path = Path(path)
    if not path.is_dir():
        return file_digest(path, cache)
    lines = []
    for root, folders, files in os.walk(path, followlinks=True):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            file = Path(root) / name
            lines.append(f"{file.relative_to(path).as_posix()}\t{file_digest(file, cache)}\n")
    if not lines:
        raise ValueError(f"{path} is an empty folder")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()
