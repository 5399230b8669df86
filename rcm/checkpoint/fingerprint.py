"""Run fingerprints: the settings that change a run's results, recorded at its start and compared on resume.

``settings_record(settings)`` turns (nested) settings into a flat, JSON-ready dict keyed by dotted field
names; every ``pathlib.Path`` value (a teacher file or folder) is recorded as ``{"path", "sha256"}``, its
content digest (``rcm.checkpoint.digest``, cached). ``mismatch_message(saved, now)`` compares two records and
returns None when they agree, else one short line naming only the differing fields as flags:
``--loss.scm.guidance: 2.0 (saved) vs 3.0 (now); --batch-size: 4 (saved) vs 8 (now); and 3 more``.

Guarantees: paths are equal when their contents are, whatever their spelling (a copy, ``..``, a link); a
file whose content changed under the same name differs. Tuples and lists compare alike (as JSON does).
Values are shown shortened, at most ``limit`` fields, then "and N more".
Not guaranteed: which settings belong in the fingerprint is the caller's choice (leave out output paths,
run length and reporting; include everything that changes the numbers, thread count included unless the
run is deterministic across thread counts). A record from before content digests holds a path as a plain
string: it is compared to the new record's spelled path, the best that can be done.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from rcm.checkpoint.digest import path_digest

_NOT_SET = object()
_SHOWN_CHARS = 48
_SHOWN_PATH_CHARS = 80


def flag_name(dotted: str) -> str:
    """``loss.scm.tangent_warmup`` → ``--loss.scm.tangent-warmup`` (the command line's spelling)."""
    return "--" + dotted.replace("_", "-")


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings (``dataclasses.asdict`` of a config) → one dict keyed by dotted names, in order."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def settings_record(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of ``settings`` (nested or flat): flat, JSON-ready, paths as content digests."""
    record = {}
    for name, value in flatten(settings).items():
        if isinstance(value, PurePath):
            try:
                record[name] = {"path": str(value), "sha256": path_digest(value)}
            except ValueError as e:
                raise ValueError(f"{flag_name(name)}: {e}") from None
        else:
            record[name] = json.loads(json.dumps(value, default=str))  # tuples → lists, enums → strings
    return record


def _is_path_record(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {"path", "sha256"}


def _same(saved: Any, now: Any) -> bool:
    if _is_path_record(saved) and _is_path_record(now):
        return saved["sha256"] == now["sha256"]
    if _is_path_record(now) and isinstance(saved, str):  # recorded before content digests: its spelling only
        return saved == now["path"]
    return saved == now


def _shown(value: Any) -> str:
    if value is _NOT_SET:
        return "not set"
    if _is_path_record(value):  # keep the file's name and digest; shorten the folders in front
        path = value["path"] if len(value["path"]) <= _SHOWN_PATH_CHARS else "…" + value["path"][1 - _SHOWN_PATH_CHARS:]
        return f"{path} [sha256 {value['sha256'][:12]}]"
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted name, saved value, current value)`` for every field that differs, current fields' order first."""
    names = list(now) + [name for name in saved if name not in now]
    found = []
    for name in names:
        old, new = saved.get(name, _NOT_SET), now.get(name, _NOT_SET)
        if old is _NOT_SET or new is _NOT_SET or not _same(old, new):
            found.append((name, old, new))
    return found


def mismatch_message(saved: Mapping[str, Any], now: Mapping[str, Any], limit: int = 5) -> str | None:
    """None when ``saved`` and ``now`` (two ``settings_record``s) agree, else one short line of the differences."""
    found = differences(saved, now)
    if not found:
        return None
    parts = [f"{flag_name(name)}: {_shown(old)} (saved) vs {_shown(new)} (now)" for name, old, new in found[:limit]]
    if len(found) > limit:
        parts.append(f"and {len(found) - limit} more")
    return "; ".join(parts)
