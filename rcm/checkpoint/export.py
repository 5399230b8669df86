"""`rcm export`: one network of a training checkpoint (single-process file or DCP folder written by any
world size) as one safetensors file that `rcm sample` loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rcm import ConfigError, PathArgumentError, check_output_file

from rcm.checkpoint.atomic import atomic_write_bytes
from rcm.checkpoint.local import LATEST, list_checkpoints, load_file


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

    def __post_init__(self):  # before a checkpoint of many GB is read
        if not Path(self.checkpoint).exists():
            raise PathArgumentError("checkpoint", f"no such file or folder: {self.checkpoint}")
        check_output_file("out", self.out)


def _newest(folder: Path) -> Path:
    """The checkpoint `latest` names in a run's checkpoints/ folder, else the newest complete one."""
    from rcm.checkpoint.dcp import list_sharded_checkpoints

    found = sorted(list_checkpoints(folder) + list_sharded_checkpoints(folder), key=lambda p: p.name)
    pointer = folder / LATEST
    if pointer.is_file():
        named = [p for p in found if p.name == pointer.read_text().strip()]
        if named:
            return named[0]
    if not found:
        raise ConfigError("checkpoint", f"{folder} holds no complete checkpoint (step_XXXXXXXX.pt or DCP folder)")
    return found[-1]


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.model``'s weights from ``cfg.checkpoint`` to ``cfg.out`` (atomically); returns the path.
    ``cfg.out`` is claimed for this process first (``rcm.checkpoint.run_folder.claimed_file``)."""
    from rcm.checkpoint.run_folder import claimed_file

    path = Path(cfg.checkpoint)
    if not path.exists():
        raise PathArgumentError("checkpoint", f"no such file or folder: {path}")
    with claimed_file(cfg.out, "out"):
        return _export(cfg, path)


def _export(cfg: ExportConfig, path: Path) -> Path:
    from safetensors.torch import save

    from rcm.checkpoint.dcp import read_checkpoint_model

    if path.is_dir() and not (path / ".metadata").is_file():
        path = _newest(path)
    network = {}
    if path.is_dir():  # DCP: read in this process, whatever world size wrote it
        weights = read_checkpoint_model(path, cfg.model)
    else:
        saved = load_file(path)
        network = saved.get("config", {}).get("network") or {}  # the architecture, where the task recorded it
        train = saved.get("train")
        if not isinstance(train, dict) or train.get(cfg.model) is None:
            raise ConfigError("checkpoint", f"{path} holds no {cfg.model!r} network")
        weights = train[cfg.model]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "keep": None}[cfg.dtype]
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
               for k, v in weights.items()}
    kind = "teacher" if cfg.model == "fake_score" else "student"  # a fake score samples like a teacher (a denoiser)
    data = save(weights, metadata={**{k: str(v) for k, v in network.items()}, "kind": kind, "source": str(path),
                                   "network": cfg.model})
    atomic_write_bytes(Path(cfg.out), data)
    from rcm.checkpoint.card import export_card  # a student's model card beside it (rcm.checkpoint.card)

    export_card(Path(cfg.out), path, None if path.is_dir() else saved, cfg.model)
    print(f"{cfg.model} of {path} → {cfg.out} ({sum(v.numel() for v in weights.values()) / 1e6:,.1f}M parameters)")
    return Path(cfg.out)
