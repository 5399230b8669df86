"""Where a command writes, claimed for one process (issue 17): an output folder, or one output file.

- ``claimed_folder(folder, kind, field=...)`` (a context manager) — every command that writes a folder
  (`rcm distill`, `train-teacher`, `eval`, `study`, `synth`): the folder must be new, empty, or one this kind
  of command wrote (a ``.rcm-run`` marker holding the kind; older folders are known by a file only that
  command writes, ``legacy``); anything else — the current directory, a file, someone else's files, another
  command's folder — is a ``ConfigError`` naming the field before anything is written. Then the folder's
  ``RunFolderLock`` is taken for the block (a second process fails at once naming the holder; a dead
  holder's lock is taken over), the marker written, and the leftovers of killed processes' atomic writes
  removed (``remove_dead_temporaries``: by process liveness). Under torchrun rank 0 does this and every rank
  learns the outcome (the other ranks would otherwise wait at their first collective).
- ``claimed_file(target, field)`` — commands that write one file (`rcm export`, `train-classifier`,
  `train-i2v-teacher`, a `train-teacher --export` outside its run folder): a file inside an rcm folder takes
  that folder's lock (one writer per run folder, whoever writes); any other file has a lock of its own beside
  it (``.<name>.rcm.lock``, removed on release); dead processes' temporaries beside it are removed. The file
  itself is written atomically by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rcm import ConfigError
from rcm.checkpoint.atomic import atomic_write_bytes, remove_dead_temporaries
from rcm.checkpoint.lock import LOCK_NAME, RunFolderLock

RUN_MARKER = ".rcm-run"  # written into a claimed folder: its other files are this kind of command's


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def folder_kind(folder: Path, legacy: tuple[str, ...] = (), kind: str | None = None) -> str | None:
    """The kind of command whose folder ``folder`` is (its marker), ``kind`` if it holds one of ``legacy``
    (folders of earlier versions have no marker), else None."""
    marker = folder / RUN_MARKER
    if marker.is_file():
        return marker.read_text().strip() or "distill"  # earlier versions' empty marker: only distill wrote one
    if kind is not None and any((folder / name).exists() for name in legacy):
        return kind
    return None


def check_folder(folder: str | Path, kind: str, field: str = "out_dir", resume: bool = True,
                 legacy: tuple[str, ...] = ()) -> None:
    """Raise a ``ConfigError`` on ``field`` unless a ``kind`` command may write ``folder`` (see the module notes);
    ``resume=False`` also refuses a folder that holds this kind's files already."""
    if str(folder).strip() in ("", "."):
        raise ConfigError(field, "must name a folder (the current directory is not one)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(field, f"{folder} is a file, not a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    found = folder_kind(folder, legacy, kind)
    others = [e for e in entries if e != LOCK_NAME]
    if found is None and others:
        raise ConfigError(field, f"{folder} holds files that are not an rcm {kind} folder's (e.g. {others[0]}); "
                                 f"give an empty or new folder")
    if found is not None and found != kind:
        raise ConfigError(field, f"{folder} is an `rcm {found}` folder, not an `rcm {kind}` one; use another {_flag(field)}")
    if found is not None and not resume and any(e not in (RUN_MARKER, LOCK_NAME) for e in entries):
        raise ConfigError(field, f"{folder} already holds a run; use another {_flag(field)} or drop --no-resume "
                                 f"to continue it")


def claim_folder(folder: str | Path, kind: str, field: str = "out_dir", resume: bool = True,
                 legacy: tuple[str, ...] = ()) -> RunFolderLock:
    """``check_folder``, then lock ``folder`` (created) and mark it; returns the held lock (release it)."""
    check_folder(folder, kind, field, resume, legacy)  # before the lock: a refused folder gets no lock file
    folder = Path(folder)
    lock = RunFolderLock(folder, flag=_flag(field)).acquire()
    try:
        check_folder(folder, kind, field, resume, legacy)  # again, as the one writer: a claim may have come between
        if not (folder / RUN_MARKER).is_file():
            atomic_write_bytes(folder / RUN_MARKER, kind.encode())
        remove_dead_temporaries(folder)  # half-written files of killed processes (an export, say); never a live one's
    except BaseException:
        lock.release()
        raise
    return lock


@contextmanager
def claimed_folder(folder: str | Path, kind: str, field: str = "out_dir", resume: bool = True,
                   legacy: tuple[str, ...] = ()) -> Iterator[RunFolderLock | None]:
    """``claim_folder`` for the block; under torchrun on rank 0, the outcome shared with every rank
    (which get None)."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    error, lock = None, None
    if not group or dist.get_rank() == 0:
        try:
            lock = claim_folder(folder, kind, field, resume, legacy)
        except ValueError as e:
            error = e
    if group:
        shared = [None if error is None else str(error)]
        dist.broadcast_object_list(shared, src=0)
        if error is None and shared[0] is not None:
            error = ValueError(shared[0])
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def claim_file(target: str | Path, field: str, folder_output: bool = False) -> RunFolderLock:
    """Lock the one output file ``target`` (see the module notes); returns the held lock (release it).
    ``folder_output``: ``target`` is one output written as a whole folder (`rcm export --layout diffusers`),
    locked as a file would be; the caller checks what an existing one holds."""
    if str(target).strip() in ("", "."):
        raise ConfigError(field, "must name a folder (the current directory is not one)" if folder_output
                          else "must name a file")
    target = Path(target)
    if target.is_dir() and not folder_output:
        raise ConfigError(field, f"{target} is a folder; give a file path")
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(field, f"{folder} is a file, not a folder")
    if (folder / RUN_MARKER).is_file() or (folder / LOCK_NAME).is_file():  # an rcm folder: its one writer
        lock = RunFolderLock(folder, flag=_flag(field)).acquire()
    else:
        lock = RunFolderLock(folder, name=f".{target.name[:200]}.rcm.lock", what=f"output {target}",
                             flag=_flag(field), remove_on_release=True).acquire()
    remove_dead_temporaries(folder)  # a killed write's leftovers (by process liveness: never a live one's)
    return lock


@contextmanager
def claimed_file(target: str | Path, field: str, folder_output: bool = False) -> Iterator[RunFolderLock]:
    """``claim_file`` for the block."""
    lock = claim_file(target, field, folder_output)
    try:
        yield lock
    finally:
        lock.release()
