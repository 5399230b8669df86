"""Model cards: ``<stem>.card.json`` beside an exported student's ``<stem>.safetensors`` (or folder).

A card says what the weights are and how to sample them: the teacher it was distilled from, the method,
the iterations, the sampler settings it was evaluated with (``sampling``: ``steps``, ``sigma_max``,
``mid_times`` per step count) and its metrics where the run measured them. `rcm distill` writes one at
the end of a run, `rcm export` beside every exported student; ``rcm.pipeline`` and `rcm sample` take their
sampling defaults from it (explicit arguments win; no card: the application's defaults)::

    {"format": "rcm-model-card", "version": 1, "kind": "student", "family": "digits",
     "teacher": "rcm/assets/digits_teacher.safetensors", "method": "rcm", "iterations": 400,
     "sampling": {"steps": 4, "sigma_max": 80.0, "mid_times": {"1": [], "2": [0.8], "4": [0.8, 0.6, 0.4]}},
     "metrics": {"rcm@2": {"frame_acc": 0.82, ...}}}
"""

from __future__ import annotations

import json
from pathlib import Path

from rcm.checkpoint.atomic import atomic_write_bytes

__all__ = ["CARD_FORMAT", "card_mid_times", "card_path", "export_card", "read_card", "write_card"]

CARD_FORMAT = "rcm-model-card"
CARD_VERSION = 1


def card_path(weights: str | Path) -> Path:
    """The card of ``weights``: ``<stem>.card.json`` beside it (a folder ``x/``: ``x.card.json``)."""
    weights = Path(weights)
    stem = weights.name if weights.is_dir() else weights.stem
    return weights.with_name(f"{stem}.card.json")


def write_card(weights: str | Path, *, family: str | None, teacher: str | dict | None, method: str | None,
               iterations: int | None, sampling: dict, metrics: dict | None = None, kind: str = "student",
               **extra) -> Path:
    """Write the card of ``weights`` (atomically) and return its path. ``sampling``: the sampler settings
    the student was evaluated with (``steps``, ``sigma_max``, ``mid_times`` as {step count: times})."""
    card = {"format": CARD_FORMAT, "version": CARD_VERSION, "kind": kind, "family": family,
            "teacher": teacher if teacher is None or isinstance(teacher, dict) else str(teacher), "method": method,
            "iterations": None if iterations is None else int(iterations), "sampling": _plain(sampling),
            "metrics": _plain(metrics or {}), **_plain(extra)}  # fmt: skip
    path = card_path(weights)
    atomic_write_bytes(path, (json.dumps(card, indent=2, default=str) + "\n").encode())
    return path


def read_card(weights: str | Path) -> dict | None:
    """The card beside ``weights``, or None when there is none. A card that is not a JSON object with a
    ``sampling`` object is a ``ValueError`` naming the card's file."""
    path = card_path(weights)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid model card (not JSON: {e}); fix or delete it") from e
    if not isinstance(card, dict) or not isinstance(card.get("sampling", {}), dict):
        raise ValueError(f"{path}: not a valid model card (a JSON object with a 'sampling' object expected)")
    card.setdefault("sampling", {})
    return card


def card_mid_times(card: dict | None, steps: int) -> tuple[float, ...] | None:
    """The card's mid-times for a ``steps``-step student sampler, None when it has none for that count."""
    mids = ((card or {}).get("sampling") or {}).get("mid_times")
    if isinstance(mids, dict) and str(steps) in mids:
        return tuple(float(t) for t in mids[str(steps)])
    return None


def _plain(value):
    """``value`` with tuples as lists and int keys as strings (what JSON keeps)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def export_card(out: Path, checkpoint: Path, saved: dict | None, network: str) -> Path | None:
    """`rcm export`'s card beside ``out`` for a student (``network`` ema or student; a fake score gets
    none): what the run's task recorded in the checkpoint (``config.card``: family, teacher, sampling), the
    method and teacher of its recorded settings, its iterations, and the rows of this method in the run's
    ``metrics.json`` where ``<run>/checkpoints/`` holds the checkpoint. A DCP folder (read here without its
    records) or an older checkpoint gives a card with the iterations alone of these."""
    import re

    if network == "fake_score":
        return None
    config = (saved or {}).get("config") or {}
    fingerprint, recorded = config.get("fingerprint"), config.get("card")
    fingerprint = fingerprint if isinstance(fingerprint, dict) else {}  # a hand-made checkpoint's may be anything
    recorded = dict(recorded) if isinstance(recorded, dict) else {}
    train = (saved or {}).get("train") or {}
    iterations = train.get("iteration") if isinstance(train, dict) else None
    if iterations is None and (m := re.search(r"step_(\d+)", Path(checkpoint).name)):
        iterations = int(m[1])
    method = fingerprint.get("method")
    teacher = recorded.pop("teacher", None) or fingerprint.get("teacher")
    metrics = {}
    where = Path(checkpoint).resolve()
    where = where.parent if where.is_file() or where.name.startswith("step_") else where
    run_metrics = where.parent / "metrics.json"
    if where.name == "checkpoints" and run_metrics.is_file() and method:
        try:
            rows = json.loads(run_metrics.read_text()).get("rows", [])
            metrics = {r["name"]: r for r in rows if str(r.get("name", "")).startswith(f"{method}@")}
        except (ValueError, AttributeError, TypeError, KeyError):
            metrics = {}  # a damaged metrics file: the card says what is known
    recorded.pop("metrics", None)
    return write_card(out, **{"family": None, "sampling": {}, **recorded}, teacher=teacher, method=method,
                      iterations=iterations, metrics=metrics, source=str(checkpoint), network=network)
