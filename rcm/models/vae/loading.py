"""Loading and saving Wan VAE weights (2.1 and 2.2): the official ``.pth``, a diffusers ``vae/`` folder,
or a file in any of the three key layouts; strict, built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..weights import load_state_dict_strict, open_state_dict, read_state_dict
from .config import WanVAEConfig
from .layouts import _FROM, _TO, LAYOUTS, detect_vae_layout, vae_key_table
from .model import WanVAE

__all__ = ["default_vae_config", "load_vae", "read_vae_config", "save_vae"]



def _diffusers_folder(path: Path) -> tuple[Path, list[Path]]:
    folder = path / "vae" if not (path / "config.json").exists() and (path / "vae").is_dir() else path
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{path}: a diffusers VAE folder needs config.json (looked in {folder})")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / s for s in shards]
    elif (folder / "diffusion_pytorch_model.safetensors").exists():
        files = [folder / "diffusion_pytorch_model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights next to config.json")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{folder}: shard {f.name} listed in the index is missing")
    return folder, files


def default_vae_config(sd, layout: str) -> WanVAEConfig:
    """The released config a checkpoint without a config is taken to be: Wan2.2 if its encoder's first
    convolution reads 12 channels (2x2 pixel patches), else Wan2.1."""
    first = sd.get("encoder.conv1.weight" if layout == "official" else "encoder.conv_in.weight")
    if first is not None and first.ndim == 5 and first.shape[1] == WanVAEConfig.wan22().image_channels:
        return WanVAEConfig.wan22()
    return WanVAEConfig()


def read_vae_config(path: str | Path) -> WanVAEConfig:
    """The ``WanVAEConfig`` that ``load_vae(path)`` would build, from headers only (a folder's config.json,
    else the file's keys: ``default_vae_config``); the Wan2.1 / Wan2.2 question answered before loading."""
    path = Path(path)
    if path.is_dir():
        folder, _ = _diffusers_folder(path)
        return WanVAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
    sd = open_state_dict(path)
    return default_vae_config(sd, detect_vae_layout(sd.keys()))


def load_vae(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Loads a Wan VAE from the official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (or any file in the
    official, diffusers or our key layout: ``.pth/.pt/.safetensors``) or from a diffusers folder
    (``vae/`` with config.json + safetensors, or the pipeline root holding it). The model is built on
    the meta device and the weights are assigned in ``dtype`` on ``device``; every key must match (one
    ``ValueError`` lists all problems, named as in the file). ``config`` defaults to the folder's
    config.json, else to the released 2.1 or 2.2 config (``default_vae_config``)."""
    path = Path(path)
    if path.is_dir():
        folder, files = _diffusers_folder(path)
        if config is None:
            config = WanVAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
        sd = read_state_dict(files)
        layout, source = "diffusers", str(folder)
    else:
        sd = read_state_dict(path)
        layout, source = detect_vae_layout(sd.keys()), str(path)
        config = config if config is not None else default_vae_config(sd, layout)
    ours = sd if layout == "ours" else _FROM[layout](sd, config)
    if layout == "ours":
        report = lambda k: k
    else:
        table = vae_key_table(layout, len(config.dim_mult), config.num_res_blocks, config.residual)
        report = lambda k: table.get(k, k)
    with torch.device("meta"):
        model = WanVAE(config)
    load_state_dict_strict(model, ours, what="Wan VAE", source=source, dtype=dtype, device=device,
                           rename_for_report=report)  # fmt: skip
    return model.eval().requires_grad_(False)


def save_vae(model: WanVAE, path: str | Path, layout: str = "ours") -> None:
    """Writes the weights as safetensors in ``layout`` ('ours', 'official' or 'diffusers'); for
    'diffusers' ``path`` is a folder and a config.json is written next to the weights."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if layout != "ours":
        sd = _TO[layout](sd, model.config)
    path = Path(path)
    if layout == "diffusers":
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"_class_name": "AutoencoderKLWan", **model.config.to_diffusers()}
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        path = path / "diffusion_pytorch_model.safetensors"
    save_file(sd, str(path))

