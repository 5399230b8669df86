"""Atomic file writes whose temporary files belong to one process, and cleanup of only those.

Guarantees:
- ``atomic_write_bytes`` / ``atomic_write_with`` write to a temporary name in the target's folder, flush and
  fsync it, rename it over the target, then fsync the folder: after a crash the target holds either its old
  content (or is absent) or the complete new content, never part of it.
- A temporary name is unique to this process and this write: ``.<name>.tmp-<host>-<pid>-<token>-<random>``,
  where <token> is random per process (renewed in a forked child) and <host> is a hash of the host name.
- ``remove_own_temporaries`` removes only this process's leftovers; ``remove_dead_temporaries`` also removes
  those of processes of this host that are no longer running. Neither touches another live process's write.
- Errors name the output path, never the temporary name; a target that is a folder, or whose parent folder
  does not exist, raises a ``ValueError`` naming it.

Not guaranteed: the target's permissions and owner are not carried over (a new file gets the umask's mode);
durability on filesystems that ignore fsync; atomicity across folders (the temporary is always a sibling).
This module imports nothing of rcm, so any module may use it without an import circle.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_process_token = secrets.token_hex(4)
_TEMPORARY = re.compile(r"^\..*\.tmp-([0-9a-f]{8})-(\d+)-([0-9a-f]{8})-[0-9a-f]{6}$")


def _renew_token() -> None:  # a forked child shares nothing of its parent's writes
    global _process_token
    _process_token = secrets.token_hex(4)


os.register_at_fork(after_in_child=_renew_token)


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used; the message says which and why."""


class AtomicWriteError(OSError):
    """An atomic write that failed; the message names the output path. ``errno`` is the cause's, if any."""


def temporary_path(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``, unique to this process and this call (a file or a folder)."""
    path = Path(path)
    stem = path.name[:180]  # keep the whole name under the usual 255-byte limit
    return path.with_name(f".{stem}.tmp-{_HOST}-{os.getpid()}-{_process_token}-{secrets.token_hex(3)}")


def is_own_temporary(path: str | Path) -> bool:
    """Whether ``path`` is a temporary name made by ``temporary_path`` in this process."""
    match = _TEMPORARY.match(Path(path).name)
    return bool(match) and match.group(1) == _HOST and match.group(3) == _process_token


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder; give a file path")
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: its folder {path.parent} does not exist")


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where the filesystem cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _failure(path: Path, tmp: Path, error: BaseException) -> BaseException:
    """The error to raise for a failed write of ``path``: the temporary name replaced by the output path."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    elif str(tmp.name) in str(error):
        reason = str(error)
    else:
        return error  # the writer's own error (say, an object it cannot serialise): it names no temporary
    wrapped = AtomicWriteError(f"cannot write {path}: {reason.replace(str(tmp), str(path)).replace(tmp.name, path.name)}")
    wrapped.errno = getattr(error, "errno", None)
    return wrapped


def atomic_write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(temporary)`` to write a file, then move it atomically to ``path``; returns ``path``.

    For writers that take a file name, e.g. ``lambda tmp: torch.save(state, tmp)`` or
    ``lambda tmp: safetensors.torch.save_file(tensors, tmp)``. The writer may also create a folder (a DCP
    checkpoint written by one process) when ``path`` does not exist yet; its files are fsynced too. On any
    failure the temporary is removed and the error names ``path``.
    """
    path = Path(path)
    _check_target(path)
    tmp = temporary_path(path)
    try:
        writer(tmp)
        if not tmp.exists():
            raise ValueError(f"cannot write {path}: the writer created no file")
        for file in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if tmp.is_dir():
            fsync_folder(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a kill signal turned exception, a writer error: leave nothing behind
        _remove(tmp)
        failure = _failure(path, tmp, e)
        if failure is e:
            raise
        raise failure from None
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module notes); returns ``path``."""

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:  # "x": the name is fresh; never follow something planted there
            f.write(data)

    return atomic_write_with(path, write)


def _temporaries(folder: Path) -> list[tuple[Path, re.Match]]:
    if not folder.is_dir():
        return []
    return [(p, m) for p in folder.iterdir() if (m := _TEMPORARY.match(p.name))]


def remove_own_temporaries(folder: str | Path) -> list[Path]:
    """Remove this process's leftover temporaries in ``folder`` (not recursive); returns what was removed."""
    removed = []
    for path, match in _temporaries(Path(folder)):
        if match.group(1) == _HOST and match.group(3) == _process_token:
            _remove(path)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def remove_dead_temporaries(folder: str | Path) -> list[Path]:
    """Remove leftovers in ``folder`` of this process and of processes of this host that have ended.

    A reused process id keeps a dead process's leftover until that id is free again (safe direction);
    temporaries of other hosts (a shared filesystem) are never removed, their processes cannot be checked."""
    removed = []
    for path, match in _temporaries(Path(folder)):
        own = match.group(1) == _HOST and match.group(3) == _process_token
        if own or (match.group(1) == _HOST and int(match.group(2)) != os.getpid() and not _running(int(match.group(2)))):
            _remove(path)
            removed.append(path)
    return removed
