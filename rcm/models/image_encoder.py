"""The CLIP image encoder of Wan2.1 I2V, through ``transformers`` (``CLIPVisionModel``).

Wan2.1 I2V conditions its DiT on CLIP image tokens: the visual tower of open-clip's XLM-RoBERTa-Large
ViT-H/14 (width 1280, 32 blocks, 16 heads, patch 14, 224x224 input, exact-erf GELU, LayerNorm eps
1e-5, a pre-LN after the embeddings), read out as the hidden states after the **penultimate** block
(official ``visual(..., use_31_block=True)``; diffusers ``hidden_states[-2]``): ``[B, 257, 1280]``,
the class token first, no final LayerNorm.

Preprocessing (official ``CLIPModel.visual``), on images in ``[-1, 1]`` as the pipeline holds them:
``F.interpolate(x, (224, 224), mode="bicubic", align_corners=False)`` (the whole frame squashed to a
square, no crop, no antialiasing, no clamping), then ``x * 0.5 + 0.5``, then ``(x - mean) / std`` with
CLIP's mean/std. (Diffusers' pipeline instead runs ``CLIPImageProcessor`` on the PIL image: shortest
side to 224 with PIL's bicubic, centre crop; its tokens differ from Wan's for non-square images.)

Checkpoint layouts, strict in both (missing, unexpected or mis-shaped visual keys: one ``ValueError``
naming them as the file spells them), the model built on the meta device and then loaded:

* official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``: the whole CLIP in Wan's own
  module names (``wan/modules/clip.py``, loaded strictly there). The text tower (``textual.*``), the
  logit scale (``log_scale``) and the image projection head (``visual.head``, unused by Wan) are
  ignored by name. Visual keys, official vs ``transformers``::

      visual.patch_embedding.weight            embeddings.patch_embedding.weight   (Conv2d, no bias)
      visual.cls_embedding [1, 1, D]           embeddings.class_embedding [D]
      visual.pos_embedding [1, 257, D]         embeddings.position_embedding.weight [257, D]
      visual.pre_norm.*                        pre_layrnorm.*
      visual.transformer.i.norm1.*             encoder.layers.i.layer_norm1.*
      visual.transformer.i.attn.to_qkv.* [3D]  encoder.layers.i.self_attn.{q,k,v}_proj.*  (thirds, in order)
      visual.transformer.i.attn.proj.*         encoder.layers.i.self_attn.out_proj.*
      visual.transformer.i.norm2.*             encoder.layers.i.layer_norm2.*
      visual.transformer.i.mlp.{0,2}.*         encoder.layers.i.mlp.fc{1,2}.*
      visual.post_norm.*                       post_layernorm.*

* transformers / diffusers: an ``image_encoder/`` folder (``config.json`` + safetensors, maybe sharded)
  or a pipeline root holding one. Keys with or without the ``vision_model.`` prefix (older
  ``transformers`` wrote it); ``visual_projection.weight`` and a full CLIP's text keys are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .frozen_encoder import FrozenEncoder
from .wan_loading import dit_weight_files
from .weights import LazyTensor, load_state_dict_strict, open_state_dict

__all__ = [
    "CLIP_IMAGE_SIZE",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_LAYOUTS",
    "OFFICIAL_CLIP_FILE",
    "vit_h14_config",
    "preprocess_images",
    "clip_visual_key_to_official",
    "clip_visual_state_dict_from_official",
    "clip_visual_state_dict_to_official",
    "detect_clip_layout",
    "CLIPImageEncoder",
    "load_image_encoder",
    "tiny_image_encoder",
]

CLIP_IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, used by Wan's transforms
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_LAYOUTS = ("official", "transformers")
OFFICIAL_CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"  # in Wan2.1 I2V's release folder


def vit_h14_config():
    """``transformers.CLIPVisionConfig`` of the ViT-H/14 visual tower (official ``clip_xlm_roberta_vit_h_14``:
    vision_dim 1280, mlp_ratio 4, 16 heads, 32 layers, activation 'gelu', norm_eps 1e-5)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
        patch_size=14, image_size=CLIP_IMAGE_SIZE, num_channels=3, hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=1024,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Preprocessing


def preprocess_images(images: Tensor, image_size: int = CLIP_IMAGE_SIZE) -> Tensor:
    """Wan's CLIP preprocessing: ``[B, 3, H, W]`` images in ``[-1, 1]`` -> ``[B, 3, S, S]`` fp32 pixel values
    (``S = image_size``): bicubic resize of the whole frame (align_corners=False, no antialias, no
    clamp), then ``[-1, 1] -> [0, 1]``, then CLIP's mean/std normalization. Computed in fp32 as Wan
    (fp64 images stay fp64, for references)."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    x = images.to(torch.promote_types(images.dtype, torch.float32))
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * 0.5 + 0.5 - mean) / std


# ----------------------------------------------------------------------------------------------------
# Key layouts (table in the module docstring). transformers names are CLIPVisionModel's (no prefix).

_TOP = {  # transformers -> official
    "embeddings.patch_embedding.weight": "visual.patch_embedding.weight",
    "embeddings.class_embedding": "visual.cls_embedding",
    "embeddings.position_embedding.weight": "visual.pos_embedding",
    "pre_layrnorm.weight": "visual.pre_norm.weight",
    "pre_layrnorm.bias": "visual.pre_norm.bias",
    "post_layernorm.weight": "visual.post_norm.weight",
    "post_layernorm.bias": "visual.post_norm.bias",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK = {  # within a block, transformers -> official
    "layer_norm1.weight": "norm1.weight", "layer_norm1.bias": "norm1.bias",
    "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
    "layer_norm2.weight": "norm2.weight", "layer_norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.0.weight", "mlp.fc1.bias": "mlp.0.bias",
    "mlp.fc2.weight": "mlp.2.weight", "mlp.fc2.bias": "mlp.2.bias",
}  # fmt: skip
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_QKV = ("q_proj", "k_proj", "v_proj")  # the thirds of attn.to_qkv's output rows, in this order
_HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OFFICIAL_BLOCK_KEY = re.compile(r"visual\.transformer\.(\d+)\.(.+)")
_HF_QKV_KEY = re.compile(r"self_attn\.([qkv]_proj)\.(weight|bias)")


def _official_ignored(key: str) -> bool:
    """The parts of Wan's CLIP checkpoint that the image encoder does not use: the text tower, the logit
    scale and the visual projection head (Wan reads the penultimate block's tokens, before any head)."""
    return key.startswith("textual.") or key in ("log_scale", "visual.head")


def _hf_ignored(key: str) -> bool:
    """The keys of ``CLIPVisionModelWithProjection`` / ``CLIPModel`` files outside the vision tower."""
    return key in ("visual_projection.weight", "text_projection.weight", "logit_scale") or key.startswith("text_model.")


def clip_visual_key_to_official(key: str) -> str:
    """A ``CLIPVisionModel`` key -> the official key holding it (q/k/v projections -> the fused
    ``attn.to_qkv``). Unknown keys are returned unchanged."""
    if key in _TOP:
        return _TOP[key]
    m = _HF_BLOCK_KEY.fullmatch(key)
    if m:
        i, rest = m.groups()
        if rest in _BLOCK:
            return f"visual.transformer.{i}.{_BLOCK[rest]}"
        q = _HF_QKV_KEY.fullmatch(rest)
        if q:
            return f"visual.transformer.{i}.attn.to_qkv.{q.group(2)}"
    return key


def _rows(t: Tensor | LazyTensor, start: int, stop: int) -> Tensor | LazyTensor:
    if isinstance(t, LazyTensor):
        return LazyTensor((stop - start, *t.shape[1:]), t.dtype, lambda: t.load()[start:stop])
    return t[start:stop]


def clip_visual_state_dict_from_official(sd: Mapping[str, Tensor | LazyTensor]) -> dict[str, Tensor | LazyTensor]:
    """Official (Wan) CLIP keys -> ``CLIPVisionModel`` keys, tensors or ``LazyTensor``s (read lazily). The
    ignored keys (text tower, ``log_scale``, ``visual.head``) are dropped; unknown keys are kept as they
    are (a strict load reports them)."""
    out: dict[str, Tensor | LazyTensor] = {}

    def put(key, value, source):
        if key in out:
            raise ValueError(f"two CLIP keys map to {key!r} (one of them is {source!r})")
        out[key] = value

    for k, v in sd.items():
        if _official_ignored(k):
            continue
        if k in _TOP_INV:
            if k == "visual.cls_embedding":
                v = v.reshape(v.shape[-1])
            elif k == "visual.pos_embedding":
                v = v.reshape(v.shape[-2], v.shape[-1]) if len(v.shape) >= 2 else v
            put(_TOP_INV[k], v, k)
            continue
        m = _OFFICIAL_BLOCK_KEY.fullmatch(k)
        if m and m.group(2) in _BLOCK_INV:
            put(f"encoder.layers.{m.group(1)}.{_BLOCK_INV[m.group(2)]}", v, k)
        elif m and m.group(2) in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
            rows = v.shape[0]
            if rows % 3:
                raise ValueError(f"CLIP key {k!r}: {rows} rows, not a multiple of 3 (fused q, k, v)")
            n = rows // 3
            kind = m.group(2).rsplit(".", 1)[1]
            for j, name in enumerate(_QKV):
                put(f"encoder.layers.{m.group(1)}.self_attn.{name}.{kind}", _rows(v, j * n, (j + 1) * n), k)
        else:
            put(k, v, k)
    return out


def clip_visual_state_dict_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``CLIPVisionModel`` keys -> official (Wan) visual keys: q/k/v concatenated into ``attn.to_qkv``,
    the class and position embeddings given their leading unit axes. Works on meta tensors."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        new = clip_visual_key_to_official(k)
        if new.endswith((".attn.to_qkv.weight", ".attn.to_qkv.bias")):
            fused.setdefault(new, {})[_HF_QKV_KEY.fullmatch(_HF_BLOCK_KEY.fullmatch(k).group(2)).group(1)] = v
            continue
        if new == "visual.cls_embedding":
            v = v.reshape(1, 1, -1)
        elif new == "visual.pos_embedding":
            v = v.unsqueeze(0)
        if new in out:
            raise ValueError(f"two CLIP keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    for new, parts in fused.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"{new}: needs q_proj, k_proj and v_proj, got {sorted(parts)}")
        out[new] = torch.cat([parts[name] for name in _QKV])
    return out


def detect_clip_layout(keys) -> str:
    """``'official'`` (Wan's ``visual.*`` names) or ``'transformers'`` (``[vision_model.]embeddings...``)."""
    keys = list(keys)
    if any(k.startswith("visual.") for k in keys):
        return "official"
    if any(k.startswith(("embeddings.", "vision_model.", "encoder.layers.")) for k in keys):
        return "transformers"
    sample = ", ".join(sorted(keys)[:5]) or "no keys"
    raise ValueError(f"not a CLIP image encoder checkpoint (keys: {sample})")


# ----------------------------------------------------------------------------------------------------
# The encoder


class CLIPImageEncoder(FrozenEncoder):
    """A ``CLIPVisionModel`` read out as Wan reads it: ``encode(images)`` takes ``[B, 3, H, W]`` images
    in ``[-1, 1]`` and returns the hidden states after the penultimate block, ``[B, 1 + patches, width]``
    (``[B, 257, 1280]`` for ViT-H/14). Frozen (eval, no grad). ``offload()`` / ``on(device)`` move it
    off / onto a GPU."""

    def __init__(self, model, *, offload_device: str | torch.device = "cpu"):
        if model.config.num_hidden_layers < 2:
            raise ValueError(
                f"the model needs at least 2 layers (Wan reads the penultimate), got {model.config.num_hidden_layers}"
            )
        super().__init__(model, offload_device=offload_device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.model.config.patch_size) ** 2 + 1



    @torch.no_grad()
    def encode(self, images: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``[B, num_tokens, dim]`` on the encoder's device, in its dtype unless ``dtype`` is given."""
        pixels = preprocess_images(images.to(self.device), self.image_size).to(self.dtype)
        states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return states if dtype is None else states.to(dtype)




# ----------------------------------------------------------------------------------------------------
# Loading


def _check_official_keys(model, sd: Mapping, source: str) -> None:
    """Compares the file's visual keys with the model's, in the file's names and shapes (a missing fused
    ``to_qkv`` is one key, its shape the fused one): everything wrong in one ``ValueError``."""
    expected = {k: tuple(v.shape) for k, v in clip_visual_state_dict_to_official(model.state_dict()).items()}
    got = {k: tuple(v.shape) for k, v in sd.items() if not _official_ignored(k)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: {list(got[k])} vs {list(expected[k])}" for k in expected if k in got and got[k] != expected[k]
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"CLIP image encoder checkpoint {source} does not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches (file vs model)", mismatched)):  # fmt: skip
        if items:
            lines += [f"  {title} ({len(items)}):", *(f"    {x}" for x in items[:20])]
            lines += [f"    ... and {len(items) - 20} more"] if len(items) > 20 else []
    if mismatched:
        lines.append("  (shape mismatches usually mean another architecture: check the config)")
    raise ValueError("\n".join(lines))


def _read_clip_config(config_json: Path):
    """A ``CLIPVisionConfig`` from a ``config.json`` (a vision config, or a full CLIP config's
    ``vision_config``); ``None`` when the file is another model's config (Wan's release root has the DiT's)."""
    from transformers import CLIPVisionConfig

    try:
        data = json.loads(config_json.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read {config_json} ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{config_json}: not a JSON object")
    if data.get("model_type") == "clip":
        data = data.get("vision_config") or {}
    elif data.get("model_type") != "clip_vision_model":
        return None
    return CLIPVisionConfig.from_dict(data)


def load_image_encoder(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config=None,
) -> CLIPImageEncoder:
    """Loads the CLIP image encoder from
    * Wan's official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``, the release folder
      holding it, or any file in that layout (``config`` defaults to ViT-H/14),
    * a ``transformers`` folder (``config.json`` + safetensors, e.g. diffusers' ``image_encoder/``), a
      pipeline root holding ``image_encoder/``, or a weights file in that layout (``config`` or a CLIP
      ``config.json`` beside it, else ViT-H/14).
    The model is built on the meta device and loaded strictly; weights go to ``device`` in ``dtype``
    (default: fp16 on CUDA, Wan's ``clip_dtype``; fp32 elsewhere). ``device="meta"`` only validates."""
    from transformers import CLIPVisionModel

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no CLIP image encoder checkpoint at {path}")
    if path.is_dir() and (path / OFFICIAL_CLIP_FILE).is_file():  # Wan's release folder
        path = path / OFFICIAL_CLIP_FILE
    elif path.is_dir() and (path / "image_encoder").is_dir():  # a diffusers pipeline root
        path = path / "image_encoder"
    files = dit_weight_files(path)  # a file, a shard index, or a folder holding one (generic despite the name)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    sd = open_state_dict(files.files)
    layout = detect_clip_layout(sd)
    if config is None and layout == "transformers" and files.config_json is not None:
        config = _read_clip_config(files.config_json)
    config = config if config is not None else vit_h14_config()
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    if layout == "official":
        _check_official_keys(model, sd, sd.source)
        hf = clip_visual_state_dict_from_official(sd)
        rename = clip_visual_key_to_official
    else:
        prefixed = any(k.startswith("vision_model.") for k in sd)
        hf = {
            k.removeprefix("vision_model."): v
            for k, v in sd.items()
            if not _hf_ignored(k.removeprefix("vision_model."))
        }
        rename = (lambda k: "vision_model." + k) if prefixed else (lambda k: k)
    load_state_dict_strict(model, hf, what="CLIP image encoder", source=sd.source, dtype=dtype, device=device,
                           rename_for_report=rename)  # fmt: skip
    # position_ids is a non-persistent buffer: not in any file, still on the meta device after the load.
    emb = model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand(1, -1)
    return CLIPImageEncoder(model)


def tiny_image_encoder(
    hidden_size: int = 32, *, num_layers: int = 3, num_heads: int = 4, patch_size: int = 14,
    image_size: int = 28, seed: int = 0,
) -> CLIPImageEncoder:  # fmt: skip
    """A random ViT-H/14-shaped stand-in (same activation and norms, small sizes; fp32, CPU) for tests and
    CPU demos: ``encode`` returns ``[B, (image_size // patch_size)**2 + 1, hidden_size]``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    config = CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, patch_size=patch_size, image_size=image_size, hidden_act="gelu",
        layer_norm_eps=1e-5,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    return CLIPImageEncoder(model)
