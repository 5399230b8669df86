"""Wan DiT checkpoints on disk: finding the files of a release, loading and saving a ``WanDiT`` (and
Wan2.2 A14B's two experts, ``WanExperts``).

Key names are translated by ``rcm.models.wan_layouts`` (the family's state-dict adapter); reading
and strict loading are ``rcm.models.weights``'. Supported: the official release folder (one file, or
shards with an index), a diffusers ``transformer/`` folder or pipeline root, a lone ``.safetensors``
/ ``.pth`` / ``.pt``, and rCM training checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .wan import WAN_EXPERT_BOUNDARIES, WanDiT
from .wan_experts import WanExperts
from .wan_layouts import (
    detect_dit_layout,
    dit_key_to_diffusers,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
    infer_wan_config,
    select_rcm_network,
    wan_config_from_json,
    wan_config_to_diffusers,
)
from .weights import corrupt_file_error, load_state_dict_strict, open_state_dict
from rcm.checkpoint.atomic import atomic_write_with

__all__ = ["EXPERT_BOUNDARY_KEY", "DitFiles", "dit_metadata", "dit_weight_files", "expert_folders", "load_dit",
           "load_wan_experts", "load_wan_model", "read_dit_config", "save_dit", "save_wan_experts"]

# ----------------------------------------------------------------------------------------------------
# DiT files

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = _WEIGHTS + ".index.json"


class DitFiles(NamedTuple):
    """Where a DiT checkpoint's pieces are: weight files, ``config.json`` and the shard index."""

    files: list[Path]
    config_json: Path | None
    index: Path | None


def dit_weight_files(path: str | Path) -> DitFiles:
    """The files of a DiT checkpoint given as a file (``.safetensors``, ``.pth``, ``.pt``), a shard
    index (``*.index.json``), or a folder holding one of these (the official release folder, a
    diffusers ``transformer/`` folder, or a diffusers pipeline root)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DiT checkpoint at {path}")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if (folder / _INDEX).exists() or len(indexes) == 1:
            path = folder / _INDEX if (folder / _INDEX).exists() else indexes[0]
        elif (folder / _WEIGHTS).exists():
            path = folder / _WEIGHTS
        else:
            found = sorted([*folder.glob("*.safetensors"), *folder.glob("*.pth"), *folder.glob("*.pt")])
            if len(found) != 1:
                raise FileNotFoundError(
                    f"{folder}: expected {_WEIGHTS}, {_INDEX} or a single .safetensors/.pth/.pt file, found "
                    f"{', '.join(f.name for f in found) or 'none'}")
            path = found[0]
    config = path.parent / "config.json"
    config = config if config.is_file() else None
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise corrupt_file_error(path, f"not a shard index ({type(e).__name__}: {e})") from e
        files = [path.parent / s for s in shards]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{path}: shard {f.name} listed in the index is missing")
        return DitFiles(files, config, path)
    if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"{path}: not a checkpoint file (.safetensors, .pth, .pt, .bin or *.index.json)")
    return DitFiles([path], config, None)


class _DitCheckpoint:
    """An opened DiT checkpoint: official-named lazy state dict, layout, config (if recorded), names."""

    def __init__(self, path: str | Path, ema: bool | None = None):
        files, config_json, index = dit_weight_files(path)
        raw = open_state_dict(files)
        self.source = str(index.parent if index is not None else files[0])
        if index is not None:
            listed = set(json.loads(index.read_text())["weight_map"])
            if listed != set(raw):
                diff = sorted(listed ^ set(raw))
                raise ValueError(f"{index}: the index and its shards disagree on {len(diff)} keys "
                                 f"({', '.join(diff[:5])}); the checkpoint is incomplete or mixed")
        self.layout = detect_dit_layout(raw)
        self.metadata = raw.metadata
        if self.layout == "official":
            self.state_dict, self.report = dict(raw), (lambda k: k)
        elif self.layout == "diffusers":
            self.state_dict, self.report = dit_state_dict_from_diffusers(raw), dit_key_to_diffusers
        else:
            self.state_dict, prefix = select_rcm_network(raw, ema, self.source)
            self.report = lambda k: k.replace("<unprefixed>", "") if k.startswith("<unprefixed>") else prefix + k
        self.config_json = json.loads(config_json.read_text()) if config_json is not None else None

    def config(self, text_len: int | None = None):
        if "wan_config" in self.metadata:
            return wan_config_from_json(json.loads(self.metadata["wan_config"]))
        if self.config_json is not None and ("dim" in self.config_json or "num_attention_heads" in self.config_json):
            config = wan_config_from_json(self.config_json if text_len is None else {**self.config_json, "text_len": text_len})
            image = self.state_dict.get("img_emb.proj.0.weight")
            if config.image_dim is None and image is not None:  # an official i2v config.json (Wan2.1 I2V)
                config = dataclasses.replace(config, image_dim=image.shape[0])
            return config
        return infer_wan_config({k: v.shape for k, v in self.state_dict.items()}, text_len=text_len)


def read_dit_config(path: str | Path, *, ema: bool | None = None):
    """The ``WanConfig`` that ``load_dit(path)`` would build (metadata, config.json or shapes); of a
    two-expert folder, its experts' (``load_wan_model``). Reads headers only."""
    folders = expert_folders(path)
    return _DitCheckpoint(path if folders is None else folders[0], ema).config()


def dit_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a DiT's files (of a two-expert folder: the high-noise expert's);
    headers only, {} for ``.pth`` files."""
    folders = expert_folders(path)
    return dict(open_state_dict(dit_weight_files(path if folders is None else folders[0]).files).metadata)


def load_dit(
    path: str | Path,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    ema: bool | None = None,
):
    """Loads a Wan DiT (``WanDiT``, any variant) from any layout (official / diffusers / rCM; see the module doc).

    ``config``: the architecture (default: recorded in the files or inferred from the shapes).
    ``dtype``: of the floating parameters (default bf16 on CUDA, fp32 elsewhere). ``device``: where
    the weights go; ``"meta"`` validates keys and shapes from the headers without reading any data.
    ``ema``: for rCM checkpoints, ``net_ema.`` (True), ``net.`` (False) or ``net_ema.`` if present (None).
    Strict: one ``ValueError`` lists all missing / unexpected / mis-shaped keys (named as in the file);
    a truncated or corrupt file is a ``ValueError``, a missing one ``FileNotFoundError``."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = _DitCheckpoint(path, ema)
    config = config if config is not None else ckpt.config()
    with torch.device("meta"):
        model = WanDiT(config)
    sd = ckpt.state_dict
    expected = model.patch_embedding.weight.shape
    patch = sd.get("patch_embedding.weight")
    if patch is not None and len(patch.shape) == 2 and patch.shape == (expected[0], math.prod(expected[1:])):
        sd = {**sd, "patch_embedding.weight": patch.reshape(expected)}  # the reference's linear patch weight
    load_state_dict_strict(model, sd, what=f"Wan DiT ({ckpt.layout} layout)", source=ckpt.source, dtype=dtype,
                           device=device, rename_for_report=ckpt.report)  # fmt: skip
    return model


def save_dit(
    model: nn.Module,
    path: str | Path,
    *,
    layout: str = "official",
    max_shard_bytes: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Writes a ``WanDiT``'s weights as safetensors, returns the files written.

    ``path`` ending in ``.safetensors``: one file (official names, ``layout="official"`` only).
    Otherwise a folder: ``config.json`` (official or diffusers format) and ``diffusion_pytorch_model``
    ``.safetensors``, or shards + ``.index.json`` when ``max_shard_bytes`` is given. The config also
    travels as ``wan_config`` metadata in every file, so a lone file loads without guessing."""
    from safetensors.torch import save_file

    if layout not in ("official", "diffusers"):
        raise ValueError(f"save_dit: layout must be 'official' or 'diffusers', got {layout!r}")
    path = Path(path)
    config = model.config
    meta = {"format": "pt", "wan_config": json.dumps(dataclasses.asdict(config)), "layout": layout,
            **dict(metadata or {})}
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        sd = dit_state_dict_to_diffusers(sd)
    if path.suffix == ".safetensors":
        if layout != "official" or max_shard_bytes is not None:
            raise ValueError("save_dit: a single .safetensors file is the official layout, unsharded; "
                             "give a folder for the diffusers layout or shards")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in sd.items()}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        cfg_json = {"_class_name": "WanTransformer3DModel", **wan_config_to_diffusers(config)}
    else:
        model_type = "i2v" if config.cond_dim or config.image_dim is not None else "t2v"
        cfg_json = {"_class_name": "WanModel", "model_type": model_type, **dataclasses.asdict(config)}
        cfg_json["patch_size"] = list(config.patch_size)
    (path / "config.json").write_text(json.dumps(cfg_json, indent=2))
    if max_shard_bytes is None:
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(path / _WEIGHTS), metadata=meta)
        return [path / "config.json", path / _WEIGHTS]
    shards: list[list[str]] = [[]]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    n = len(shards)
    weight_map, written = {}, [path / "config.json"]
    for i, keys in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k].contiguous().cpu() for k in keys}, str(path / name), metadata=meta)
        weight_map.update({k: name for k in keys})
        written.append(path / name)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (path / _INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*written, path / _INDEX]


# ----------------------------------------------------------------------------------------------------
# Wan2.2 A14B: two experts

# folder names of (high-noise, low-noise) expert per layout
_EXPERT_FOLDERS = {"official": ("high_noise_model", "low_noise_model"), "diffusers": ("transformer", "transformer_2")}
EXPERT_BOUNDARY_KEY = "wan_expert_boundary"  # safetensors metadata written by save_wan_experts


def _default_boundary(config) -> float:
    name = "wan2.2-i2v-a14b" if config.cond_dim else "wan2.2-t2v-a14b"
    return WAN_EXPERT_BOUNDARIES[name]


def expert_folders(path: str | Path) -> tuple[Path, Path] | None:
    """(high-noise, low-noise) expert folders of a two-expert release at ``path`` (official
    ``high_noise_model/`` + ``low_noise_model/`` or diffusers ``transformer/`` + ``transformer_2/``), else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for high, low in _EXPERT_FOLDERS.values():
        if (path / high).is_dir() and (path / low).is_dir():
            return path / high, path / low
    return None


def load_wan_experts(
    path: str | Path,
    *,
    boundary: float | None = None,
    config=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> WanExperts:
    """Loads Wan2.2 A14B's two experts as one ``WanExperts`` from an official release folder
    (``high_noise_model/`` + ``low_noise_model/``) or a diffusers pipeline (``transformer/`` = high
    noise, ``transformer_2/`` = low noise, ``boundary_ratio`` in ``model_index.json``).

    ``boundary`` (RF time): this argument, else the files' (diffusers ``boundary_ratio``, or what
    ``save_wan_experts`` recorded), else the official configs' (I2V 0.900, T2V 0.875). The other
    arguments as ``load_dit``, applied to both experts (strict, meta-device)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no Wan expert folder at {path}")
    folders = expert_folders(path)
    if folders is None:
        raise FileNotFoundError(f"{path}: expected the expert folders high_noise_model/ + low_noise_model/ "
                                f"(official) or transformer/ + transformer_2/ (diffusers)")
    high_dir, low_dir = folders
    if boundary is None and high_dir.name == "transformer" and (path / "model_index.json").is_file():
        boundary = json.loads((path / "model_index.json").read_text()).get("boundary_ratio")
    if boundary is None:
        meta = _DitCheckpoint(high_dir).metadata
        boundary = float(meta[EXPERT_BOUNDARY_KEY]) if EXPERT_BOUNDARY_KEY in meta else None
    high = load_dit(high_dir, config=config, dtype=dtype, device=device)
    low = load_dit(low_dir, config=config if config is not None else high.config, dtype=dtype, device=device)
    return WanExperts(high, low, boundary if boundary is not None else _default_boundary(high.config))


def load_wan_model(
    path: str | Path,
    *,
    boundary: float | None = None,
    config=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> WanDiT | WanExperts:
    """What a DiT path holds: a two-expert folder as ``WanExperts`` (``load_wan_experts``), anything else
    as one ``WanDiT`` (``load_dit``; ``boundary`` must then be None). Both strict and meta-device."""
    if expert_folders(path) is not None:
        return load_wan_experts(path, boundary=boundary, config=config, dtype=dtype, device=device)
    if boundary is not None:
        raise ValueError(f"boundary given, but {path} holds one DiT, not two experts (high_noise_model/ + "
                         f"low_noise_model/ or transformer/ + transformer_2/)")
    return load_dit(path, config=config, dtype=dtype, device=device)


def save_wan_experts(experts: WanExperts, path: str | Path, *, layout: str = "official",
                     metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Writes both experts in the official (``high_noise_model/``, ``low_noise_model/``) or diffusers
    (``transformer/``, ``transformer_2/``, ``model_index.json`` with ``boundary_ratio``) layout; the
    boundary also travels as safetensors metadata (with ``metadata``, e.g. ``kind=student``). Returns the
    files written."""
    if layout not in _EXPERT_FOLDERS:
        raise ValueError(f"save_wan_experts: layout must be 'official' or 'diffusers', got {layout!r}")
    path = Path(path)
    meta = {**dict(metadata or {}), EXPERT_BOUNDARY_KEY: repr(experts.boundary)}
    high, low = _EXPERT_FOLDERS[layout]
    written = [*save_dit(experts.high_noise, path / high, layout=layout, metadata=meta),
               *save_dit(experts.low_noise, path / low, layout=layout, metadata=meta)]
    if layout == "diffusers":
        index = {"_class_name": "WanPipeline", "boundary_ratio": experts.boundary,
                 "transformer": ["diffusers", "WanTransformer3DModel"],
                 "transformer_2": ["diffusers", "WanTransformer3DModel"]}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))
        written.append(path / "model_index.json")
    return written
