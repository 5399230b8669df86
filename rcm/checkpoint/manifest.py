"""Checksum manifests: a checkpoint (one file, or a DCP folder of files) you can trust before loading it.

After a checkpoint is complete under its final name, ``write_manifest`` writes ``<checkpoint>.sha256.json``
beside it (atomically, last): the size and sha256 of every file. ``verify`` recomputes them and returns a
``Verification``: "ok", "corrupt" with what is wrong (a file missing, a size or digest that differs, a file
the manifest does not list, an unreadable manifest), or "unverified" for a checkpoint without a manifest
(written before manifests existed, or by a run killed between its rename and its manifest). ``newest_intact``
picks the newest checkpoint that is not corrupt and returns the corrupt ones it passed over, for a warning.

Guarantees: a changed byte, a truncation, a lost or added file is reported by file name. Files are hashed in
1 MiB chunks, the files of a folder on a few threads (hashlib and file reads release the GIL).
Not guaranteed: a manifest proves integrity against accidents (bit rot, truncation, partial copies), not
against someone who rewrites the manifest too; a digest costs one full read of the checkpoint (measured in
docs/reliability.md), so ``verify(..., digests=False)`` checks names and sizes only.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rcm.checkpoint.atomic import atomic_write_bytes
from rcm.checkpoint.digest import sha256_file

MANIFEST_SUFFIX = ".sha256.json"
FORMAT = 1
_THREADS = 4


def manifest_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + MANIFEST_SUFFIX)


def checkpoint_files(checkpoint: str | Path) -> list[str]:
    """The files a checkpoint consists of, relative to it ("." for a single-file checkpoint), sorted."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_file():
        return ["."]
    if not checkpoint.is_dir():
        raise ValueError(f"checkpoint {checkpoint} does not exist")
    return sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())


def hash_entries(checkpoint: str | Path, files: list[str] | None = None) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` for ``files`` of ``checkpoint`` (default: all). Under torchrun each rank
    may hash ``checkpoint_files(c)[rank::world]`` and rank 0 merge the dicts into ``write_manifest``."""
    checkpoint = Path(checkpoint)
    files = checkpoint_files(checkpoint) if files is None else files

    def entry(name: str) -> tuple[str, dict]:
        path = checkpoint if name == "." else checkpoint / name
        return name, {"size": path.stat().st_size, "sha256": sha256_file(path)}

    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(files)))) as pool:
        return dict(pool.map(entry, files))


def write_manifest(checkpoint: str | Path, entries: dict[str, dict] | None = None) -> Path:
    """Write ``checkpoint``'s manifest (hashing it unless ``entries`` are given); returns the manifest path.
    Call it after the checkpoint has its final name and before the ``latest`` pointer moves to it."""
    checkpoint = Path(checkpoint)
    entries = hash_entries(checkpoint) if entries is None else entries
    kind = "file" if checkpoint.is_file() else "folder"
    missing = sorted(set(checkpoint_files(checkpoint)) - set(entries))
    if missing:
        raise ValueError(f"manifest of {checkpoint}: no entries for {', '.join(missing[:5])}")
    record = {"format": FORMAT, "kind": kind, "files": dict(sorted(entries.items()))}
    return atomic_write_bytes(manifest_path(checkpoint), json.dumps(record, indent=1).encode())


def discard_manifest(checkpoint: str | Path) -> None:
    """Remove ``checkpoint``'s manifest: before a new checkpoint replaces one of the same name, and when pruning."""
    manifest_path(checkpoint).unlink(missing_ok=True)


@dataclass
class Verification:
    path: Path
    status: Literal["ok", "unverified", "corrupt"]
    problems: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if self.status == "ok":
            return f"checkpoint {self.path} verified"
        if self.status == "unverified":
            return f"checkpoint {self.path} has no checksum manifest; it is loaded unverified"
        shown = "; ".join(self.problems[:5])
        more = f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else ""
        return f"checkpoint {self.path} is corrupt: {shown}{more}"


def _read_manifest(checkpoint: Path) -> dict | None:
    record = json.loads(manifest_path(checkpoint).read_text())
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("format") != FORMAT or record.get("kind") not in ("file", "folder") or not isinstance(files, dict):
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
               for e in files.values()):
        return None
    return record


def verify(checkpoint: str | Path, digests: bool = True) -> Verification:
    """Check ``checkpoint`` against its manifest (see the module notes); ``digests=False``: names and sizes only."""
    checkpoint = Path(checkpoint)
    manifest = manifest_path(checkpoint)
    if not manifest.is_file():
        if checkpoint.exists():
            return Verification(checkpoint, "unverified")
        return Verification(checkpoint, "corrupt", ["it does not exist"])
    try:
        record = _read_manifest(checkpoint)
    except (OSError, ValueError, AttributeError):
        record = None
    if record is None:
        return Verification(checkpoint, "corrupt", [f"its checksum manifest {manifest.name} is unreadable"])
    if not checkpoint.exists():
        return Verification(checkpoint, "corrupt", ["it does not exist"])
    if (record["kind"] == "file") != checkpoint.is_file():
        return Verification(checkpoint, "corrupt", [f"it is not a {record['kind']}, as its manifest says"])
    expected = record["files"]
    present = set(checkpoint_files(checkpoint))
    problems = [f"{name} is missing" for name in sorted(set(expected) - present)]
    problems += [f"{name} is not in the manifest" for name in sorted(present - set(expected))]
    sized = []
    for name in sorted(set(expected) & present):
        size = (checkpoint if name == "." else checkpoint / name).stat().st_size
        if size != expected[name]["size"]:
            problems.append(f"{_label(checkpoint, name)} has {size} bytes, expected {expected[name]['size']}")
        else:
            sized.append(name)
    if digests and sized:
        actual = hash_entries(checkpoint, sized)
        problems += [f"{_label(checkpoint, n)} digest mismatch" for n in sized
                     if actual[n]["sha256"] != expected[n]["sha256"]]
    return Verification(checkpoint, "corrupt" if problems else "ok", problems)


def _label(checkpoint: Path, name: str) -> str:
    return checkpoint.name if name == "." else name


def newest_intact(candidates: list[Path], digests: bool = True) -> tuple[Verification | None, list[Verification]]:
    """Of ``candidates`` (oldest first), the newest one that is not corrupt ("ok" or "unverified"), and the
    corrupt newer ones passed over (warn with each one's ``message``). ``(None, all)`` if every one is corrupt."""
    passed_over = []
    for checkpoint in reversed(candidates):
        result = verify(checkpoint, digests)
        if result.status != "corrupt":
            return result, passed_over
        passed_over.append(result)
    return None, passed_over
