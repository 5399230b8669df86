"""`rcm export`: one network of a training checkpoint (single-process file or DCP folder written by any
world size) as one safetensors file that `rcm sample` loads, or, for a Wan DiT, as a folder in the official
Wan or the diffusers layout (``--layout``; the key mappings are ``rcm.models.wan_layouts``', the writers
``rcm.models.wan_loading.save_dit`` / ``save_wan_experts``)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rcm import ConfigError, PathArgumentError, check_output_file
from rcm.checkpoint.atomic import atomic_write_bytes, atomic_write_with, temporary_path

# what a folder export holds (save_dit / save_wan_experts): an existing folder of only these is replaced
_FOLDER_EXPORT_NAMES = {"config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                        "high_noise_model", "low_noise_model", "transformer", "transformer_2"}


@dataclass
class ExportConfig:
    """Export one network of a training checkpoint: one safetensors file for `rcm sample` (--layout rcm),
    or a Wan DiT as a folder in the official Wan or the diffusers layout.

    Takes a run's checkpoints/ folder (its latest complete checkpoint), one DCP step folder (written by any
    number of torchrun ranks; read in this one process) or one single-process step_XXXXXXXX.pt file."""

    checkpoint: Path
    """the checkpoint: a run's checkpoints/ folder, a DCP step folder, or a step_XXXXXXXX.pt file."""
    out: Path | None = None
    """where to write: a file with --layout rcm, else a folder. An existing file is replaced; an existing folder only
    if it holds nothing but an export's files. None: student_ema.safetensors (rcm), student_ema/ (official, diffusers)."""
    model: Literal["ema", "student", "fake_score"] = "ema"
    """which network: the EMA student (what rCM releases), the live student, or the fake score."""
    dtype: Literal["bfloat16", "float32", "keep"] = "bfloat16"
    """dtype of the written weights (keep: as stored)."""
    layout: Literal["rcm", "official", "diffusers"] = "rcm"
    """the key names and form of the output.
    rcm: one .safetensors file, the network's own key names, the architecture the run recorded as metadata; any network.
    official (a Wan DiT only): a folder as the Wan repository releases a DiT, with its key names.
    diffusers (a Wan DiT only): a folder that diffusers' WanTransformer3DModel.from_pretrained reads.
    Both folders hold config.json + diffusion_pytorch_model.safetensors; of two experts (Wan2.2 A14B):
    high_noise_model/ + low_noise_model/ (official), transformer/ + transformer_2/ + model_index.json (diffusers).
    `rcm sample wan --dit-path` loads a Wan DiT in every layout."""

    def __post_init__(self):  # before a checkpoint of many GB is read
        if not Path(self.checkpoint).exists():
            raise PathArgumentError("checkpoint", f"no such file or folder: {self.checkpoint}")
        if self.out is None:
            self.out = Path("student_ema.safetensors" if self.layout == "rcm" else "student_ema")
        if self.layout == "rcm":
            check_output_file("out", self.out)
        else:
            check_export_folder(self.out, self.layout)


def check_export_folder(out: Path, layout: str) -> None:
    """``out`` may receive a folder export: new, or an earlier export (only the files one writes)."""
    if str(out).strip() in ("", "."):
        raise ConfigError("out", "must name a folder (the current directory is not one)")
    out = Path(out)
    if out.suffix == ".safetensors":
        raise ConfigError("out", f"--layout {layout} writes a folder (config.json + diffusion_pytorch_model.safetensors); "
                                 f"give a folder path, not {out}")
    if out.exists() and not out.is_dir():
        raise ConfigError("out", f"{out} is a file; --layout {layout} writes a folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in _FOLDER_EXPORT_NAMES) if out.is_dir() else []
    if others:
        raise ConfigError("out", f"{out} holds files that are not an rcm export's (e.g. {others[0]}); "
                                 f"give a new folder")


def _newest(folder: Path) -> Path:
    """The checkpoint `latest` names in a run's checkpoints/ folder, else the newest complete one."""
    from rcm.checkpoint.dcp import list_sharded_checkpoints
    from rcm.checkpoint.local import LATEST, list_checkpoints  # here, not at the top: `rcm export --help` needs no torch

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
    with claimed_file(cfg.out, "out", folder_output=cfg.layout != "rcm"):
        return _export(cfg, path)


def _recorded_network(path: Path) -> dict:
    """The architecture a task recorded in a DCP checkpoint (``network_metadata``), {} if none; no tensor read."""
    from rcm.checkpoint.dcp import read_checkpoint_extra

    try:
        extra = read_checkpoint_extra(path)
    except Exception:  # an older or foreign layout of the ranks' object: nothing recorded, as before
        return {}
    config = extra.get("config") if isinstance(extra, dict) else None
    return (config.get("network") or {}) if isinstance(config, dict) else {}


def _check_layout_fits(cfg: ExportConfig, network: dict, path: Path) -> None:
    """A layout other than rcm is for Wan DiTs: a network recorded as a class-conditioned digits DiT is refused
    before its weights are read."""
    if cfg.layout != "rcm" and "num_classes" in network:
        raise ConfigError("layout", f"{cfg.layout!r} is for Wan DiTs; the {cfg.model} network of {path} is the "
                                    f"digits demo's class-conditioned DiT: export it with --layout rcm")


def _export(cfg: ExportConfig, path: Path) -> Path:
    import torch
    from safetensors.torch import save

    from rcm.checkpoint.dcp import read_checkpoint_model
    from rcm.checkpoint.local import load_file

    if path.is_dir() and not (path / ".metadata").is_file():
        path = _newest(path)
    if path.is_dir():  # DCP: read in this process, whatever world size wrote it
        network = _recorded_network(path)
        _check_layout_fits(cfg, network, path)
        weights = read_checkpoint_model(path, cfg.model)
    else:
        saved = load_file(path, mmap=True)  # memory-mapped: what is not exported is never read
        config = saved.get("config")
        network = (config.get("network") if isinstance(config, dict) else None) or {}  # where the task recorded it
        _check_layout_fits(cfg, network, path)
        train = saved.get("train")
        if not isinstance(train, dict) or train.get(cfg.model) is None:
            raise ConfigError("checkpoint", f"{path} holds no {cfg.model!r} network")
        weights = train[cfg.model]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "keep": None}[cfg.dtype]
    weights = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
               for k, v in weights.items()}
    kind = "teacher" if cfg.model == "fake_score" else "student"  # a fake score samples like a teacher (a denoiser)
    metadata = {**{k: str(v) for k, v in network.items()}, "kind": kind, "source": str(path), "network": cfg.model}
    out = Path(cfg.out)
    if cfg.layout == "rcm":
        atomic_write_bytes(out, save(weights, metadata=metadata))
    else:
        _write_folder(_wan_network(weights, network, f"the {cfg.model} network of {path}", cfg.layout), out,
                      cfg.layout, metadata)
    from rcm.checkpoint.card import export_card  # a student's model card beside it (rcm.checkpoint.card)

    export_card(out, path, None if path.is_dir() else saved, cfg.model)
    print(f"{cfg.model} of {path} → {out}{'' if cfg.layout == 'rcm' else f' ({cfg.layout} layout)'} "
          f"({sum(v.numel() for v in weights.values()) / 1e6:,.1f}M parameters)")
    return out


def _wan_network(weights: dict, network: dict, what: str, layout: str):
    """The checkpoint's network as a ``WanDiT`` (or ``WanExperts``) holding ``weights`` (no copy, dtypes kept);
    a ConfigError naming ``layout`` when it is not one."""
    import torch

    from rcm.models import WanDiT, WanExperts, infer_wan_config, load_state_dict_strict, wan_config_from_json
    from rcm.models.wan_loading import EXPERT_BOUNDARY_KEY

    def refuse(reason: str) -> ConfigError:
        return ConfigError("layout", f"{layout!r} is for Wan DiTs; {what} is not one ({reason}); "
                                     f"export it with --layout rcm")

    experts = bool(weights) and all(k.startswith(("high_noise.", "low_noise.")) for k in weights)
    parts = ({p: {k[len(p) + 1:]: v for k, v in weights.items() if k.startswith(p + ".")}
              for p in ("high_noise", "low_noise")} if experts else {"": weights})
    try:
        if "wan_config" in network:  # recorded by the task: exact, the number of heads included
            config = wan_config_from_json(json.loads(network["wan_config"]))
        else:  # a checkpoint of an older rcm: from the shapes, as the loader does
            config = infer_wan_config({k: tuple(v.shape) for k, v in next(iter(parts.values())).items()})
    except ValueError as e:
        raise refuse(" ".join(str(e).split())[:200]) from e

    def dit(sd: dict):
        with torch.device("meta"):
            model = WanDiT(config)
        unexpected, missing = sorted(sd.keys() - model.state_dict().keys()), sorted(model.state_dict().keys() - sd.keys())
        if unexpected or missing:
            raise refuse(f"{unexpected[0]!r} is not a Wan DiT key" if unexpected else f"it lacks {missing[0]!r}")
        try:
            return load_state_dict_strict(model, sd, what="Wan DiT", source=what)  # assigns: dtypes as given
        except ValueError as e:
            raise refuse("; ".join(line.strip() for line in str(e).splitlines()[1:3])) from e

    if not experts:
        return dit(weights)
    if EXPERT_BOUNDARY_KEY not in network:
        raise ConfigError("layout", f"{what} is two experts, and the checkpoint records no boundary between them "
                                    f"(written by an older rcm): export it with --layout rcm")
    return WanExperts(dit(parts["high_noise"]), dit(parts["low_noise"]), float(network[EXPERT_BOUNDARY_KEY]))


def _write_folder(model, out: Path, layout: str, metadata: dict) -> None:
    """``model`` as a folder in ``layout`` at ``out``, atomically: written beside it, then renamed over an
    earlier export (moved aside first; a kill in between leaves a temporary that the next claim removes)."""
    from rcm.models import WanExperts, save_dit, save_wan_experts

    save = save_wan_experts if isinstance(model, WanExperts) else save_dit
    out.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if out.is_dir():
        old = temporary_path(out)
        os.replace(out, old)
    try:
        atomic_write_with(out, lambda tmp: save(model, tmp, layout=layout, metadata=metadata))
    except BaseException:
        if old is not None:
            os.replace(old, out)  # a failed export leaves the earlier one
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
