"""The Wan DiT family's state-dict adapter: its checkpoint key layouts and its configs in JSON.

Wan DiT layouts (our module names ARE the official ones, docs/method.md §8):

    official   Wan-AI/Wan2.1-*, Wan2.2-* (each A14B expert folder): one
               ``diffusion_pytorch_model.safetensors``, or shards with
               ``diffusion_pytorch_model.safetensors.index.json``, or a ``.pth``
    diffusers  ``transformer/`` folder of a diffusers pipeline (config.json + safetensors), the names
               of ``diffusers.WanTransformer3DModel``:
                 patch_embedding                     patch_embedding
                 text_embedding.{0,2}                condition_embedder.text_embedder.linear_{1,2}
                 time_embedding.{0,2}                condition_embedder.time_embedder.linear_{1,2}
                 time_projection.1                   condition_embedder.time_proj
                 head.modulation / head.head         scale_shift_table / proj_out
                 blocks.i.modulation                 blocks.i.scale_shift_table
                 blocks.i.self_attn.{q,k,v}          blocks.i.attn1.to_{q,k,v}
                 blocks.i.self_attn.o                blocks.i.attn1.to_out.0
                 blocks.i.self_attn.norm_{q,k}       blocks.i.attn1.norm_{q,k}      (cross_attn: attn2)
                 blocks.i.norm3                      blocks.i.norm2
                 blocks.i.ffn.{0,2}                  blocks.i.ffn.net.0.proj / blocks.i.ffn.net.2
               and for Wan2.1 I2V's CLIP image tokens:
                 img_emb.proj.{0,4}                  condition_embedder.image_embedder.norm{1,2}
                 img_emb.proj.{1,3}                  condition_embedder.image_embedder.ff.net.{0.proj,2}
                 blocks.i.cross_attn.{k,v}_img       blocks.i.attn2.add_{k,v}_proj
                 blocks.i.cross_attn.norm_k_img      blocks.i.attn2.norm_added_k
    rcm        released rCM students / reference training checkpoints (``.pt``): official names behind
               ``net.`` (and ``net_ema.``, preferred when present, as the reference loads it), maybe
               with ``_checkpoint_wrapped_module.`` inside, and the patch embedding flattened to
               ``[dim, C·kt·kh·kw]`` (reshaped back to the Conv3d shape).

The layout is detected from the keys (``detect_dit_layout``). ``rcm.models.wan_loading`` finds the
files and loads them; the architecture comes from, in this order: the ``config``
argument, the ``wan_config`` safetensors metadata (written by ``save_dit``), a ``config.json`` beside
the weights (official or diffusers format), or the tensor shapes (``infer_wan_config``; the number
of heads is not in the shapes: a named config of the same width, else head_dim 128 as every Wan model).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor

from .wan import WAN_CONFIGS, WanConfig
from .weights import rename_keys

__all__ = [
    "DIT_LAYOUTS",
    "detect_dit_layout",
    "dit_key_from_diffusers",
    "dit_key_to_diffusers",
    "dit_state_dict_from_diffusers",
    "dit_state_dict_to_diffusers",
    "infer_wan_config",
    "select_rcm_network",
    "wan_config_from_json",
    "wan_config_to_diffusers",
]

DIT_LAYOUTS = ("official", "diffusers", "rcm")

# ----------------------------------------------------------------------------------------------------
# Wan DiT key layouts

# (official, diffusers) name pieces; blocks.{i}. is prepended for the block-level ones.
_DIT_TOP = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    ("patch_embedding.", "patch_embedding."),
    # Wan2.1 I2V: the CLIP image projection
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
]
_DIT_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q.", "attn1.norm_q."), ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q.", "attn2.norm_q."), ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img.", "attn2.add_k_proj."), ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
]  # fmt: skip
_BLOCK_KEY = re.compile(r"(blocks\.\d+\.)(.*)")


def _rename_piece(rest: str, table: list[tuple[str, str]], forward: bool) -> str | None:
    for a, b in table:
        src, dst = (a, b) if forward else (b, a)
        if rest == src or (src.endswith(".") and rest.startswith(src)):
            return dst + rest[len(src):]
    return None


def _convert_key(key: str, forward: bool) -> str:
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        new = _rename_piece(m.group(2), _DIT_BLOCK, forward)
        return key if new is None else m.group(1) + new
    new = _rename_piece(key, _DIT_TOP, forward)
    return key if new is None else new  # unknown keys are kept: a strict load reports them


def dit_key_to_diffusers(key: str) -> str:
    """An official (= our) Wan DiT key -> its ``diffusers.WanTransformer3DModel`` name."""
    return _convert_key(key, True)


def dit_key_from_diffusers(key: str) -> str:
    """A ``diffusers.WanTransformer3DModel`` key -> the official (= our) name."""
    return _convert_key(key, False)


def dit_state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (= our) Wan DiT state dict -> ``diffusers.WanTransformer3DModel`` names (same tensors)."""
    return rename_keys(sd, dit_key_to_diffusers, "Wan DiT")


def dit_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``diffusers.WanTransformer3DModel`` state dict -> official (= our) names (same tensors).

    ``attn2.norm_added_q`` is dropped: some converted I2V checkpoints carry it, no Wan model uses it
    (diffusers ignores it on load too)."""
    sd = {k: v for k, v in sd.items() if ".attn2.norm_added_q." not in k}
    return rename_keys(sd, dit_key_from_diffusers, "Wan DiT")


_RCM_PREFIXES = ("net_ema.", "net.")
_RCM_OTHER_MODELS = ("net.", "net_ema.", "fake_score.", "teacher.")  # other networks of a training checkpoint
_WRAPPER = "_checkpoint_wrapped_module."


def detect_dit_layout(keys: Iterable[str]) -> str:
    """'official', 'diffusers' or 'rcm' from the key names; ValueError if none fits."""
    keys = list(keys)
    if any(k.startswith(_RCM_PREFIXES) for k in keys):
        return "rcm"
    if any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys):
        return "diffusers"
    if any(k.startswith(("time_embedding.", "text_embedding.", "head.head.")) or ".self_attn." in k for k in keys):
        return "official"
    sample = ", ".join(sorted(keys)[:5]) or "no keys"
    raise ValueError(f"not a Wan2.1 DiT checkpoint nor a Wan2.2 one (unrecognized keys: {sample})")


def select_rcm_network(sd: Mapping, ema: bool | None, source: str) -> tuple[dict, str]:
    """The official-named state dict of one network of an rCM checkpoint, and the prefix used."""
    has = {p: any(k.startswith(p) for k in sd) for p in _RCM_PREFIXES}
    if ema is None:
        prefix = "net_ema." if has["net_ema."] else "net."
    else:
        prefix = "net_ema." if ema else "net."
        if not has[prefix]:
            raise ValueError(f"{source} has no {prefix!r} weights (ema={ema}); it has "
                             f"{', '.join(p for p, h in has.items() if h) or 'neither net. nor net_ema.'}")
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            out[k[len(prefix):].replace(_WRAPPER, "")] = v
        elif not k.startswith(_RCM_OTHER_MODELS):
            out["<unprefixed>" + k] = v  # reported as unexpected
    return out, prefix


# ----------------------------------------------------------------------------------------------------
# Configs


def wan_config_from_json(cfg: Mapping) -> WanConfig:
    """A ``WanConfig`` from a dict: ours (``asdict``, as ``save_dit`` writes it), an official Wan2.1 /
    Wan2.2 ``config.json`` (``dim``, ``num_heads``, ``model_type`` t2v / i2v / ti2v ...), or a diffusers
    ``WanTransformer3DModel`` ``config.json`` (``num_attention_heads``, ``image_dim`` ...).

    An official ``config.json`` does not say whether an i2v model has the CLIP image cross-attention
    (Wan2.1 I2V has, Wan2.2 I2V-A14B has not): the loader reads that from the keys
    (``img_emb.*``). First-last-frame (``pos_embed_seq_len``) and VACE models are not supported."""
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    if "num_attention_heads" in cfg:  # diffusers
        unsupported = {k: cfg.get(k) for k in ("pos_embed_seq_len",) if cfg.get(k)}
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        if cfg.get("added_kv_proj_dim") not in (None, dim) or bool(cfg.get("added_kv_proj_dim")) != bool(cfg.get("image_dim")):
            unsupported["added_kv_proj_dim"] = cfg.get("added_kv_proj_dim")
        if cfg.get("cross_attn_norm") is False:
            unsupported["cross_attn_norm"] = False
        if cfg.get("qk_norm") not in (None, "rms_norm_across_heads"):
            unsupported["qk_norm"] = cfg.get("qk_norm")
        if unsupported:
            raise ValueError(f"not a supported Wan transformer config (unsupported: {unsupported})")
        kw = dict(dim=dim, num_heads=cfg["num_attention_heads"],
                  ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"])
        for ours, theirs in [("in_dim", "in_channels"), ("out_dim", "out_channels"), ("text_dim", "text_dim"),
                             ("freq_dim", "freq_dim"), ("eps", "eps"), ("patch_size", "patch_size"),
                             ("rope_max_len", "rope_max_seq_len"), ("image_dim", "image_dim")]:
            if cfg.get(theirs) is not None:
                kw[ours] = cfg[theirs]
    else:  # ours or official
        if cfg.get("model_type", "t2v") not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"unsupported Wan model_type {cfg.get('model_type')!r} (supported: t2v, i2v, ti2v)")
        kw = {k: v for k, v in cfg.items() if k in fields}
    if "patch_size" in kw:
        kw["patch_size"] = tuple(kw["patch_size"])
    try:
        return WanConfig(**kw)
    except TypeError as e:
        raise ValueError(f"incomplete Wan config {dict(cfg)} ({e})") from e


def wan_config_to_diffusers(config) -> dict:
    """The ``diffusers.WanTransformer3DModel`` keyword arguments (and ``config.json``) of a ``WanConfig``."""
    return {
        "patch_size": list(config.patch_size), "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim, "in_channels": config.in_dim, "out_channels": config.out_dim,
        "text_dim": config.text_dim, "freq_dim": config.freq_dim, "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": config.eps, "image_dim": config.image_dim,
        "added_kv_proj_dim": None if config.image_dim is None else config.dim, "rope_max_seq_len": config.rope_max_len,
    }  # fmt: skip


def infer_wan_config(shapes: Mapping[str, Sequence[int]], *, text_len: int | None = None) -> WanConfig:
    """The ``WanConfig`` of an official-named state dict, from its shapes (``{key: shape}``).

    Everything but the number of heads and ``text_len`` is in the shapes. Heads: a named config of the
    same ``dim`` and ``ffn_dim`` (1.3B: 12, 14B: 40), else head_dim 128 (every Wan model).
    ``text_len``: the named config's, else 512 (Wan's umT5 length). CLIP image cross-attention: present
    when ``img_emb.*`` is (``image_len``: a named config's, else 257)."""
    need = ["patch_embedding.weight", "text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight",
            "blocks.0.ffn.0.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ValueError(f"cannot infer the Wan config: the checkpoint lacks {', '.join(missing)}")
    pw = tuple(shapes["patch_embedding.weight"])
    if len(pw) == 5:
        dim, in_dim, patch = pw[0], pw[1], tuple(pw[2:])
    elif len(pw) == 2 and pw[1] % 4 == 0:  # the reference's flattened [dim, C·1·2·2]
        dim, in_dim, patch = pw[0], pw[1] // 4, (1, 2, 2)
    else:
        raise ValueError(f"cannot infer the Wan config from patch_embedding.weight of shape {list(pw)}")
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
    named = [c for c in WAN_CONFIGS.values() if (c.dim, c.ffn_dim) == (dim, ffn_dim)]
    if named:
        num_heads, default_len = named[0].num_heads, named[0].text_len
    elif dim % 128 == 0:
        num_heads, default_len = dim // 128, 512
    else:
        raise ValueError(f"cannot infer the number of heads of a Wan DiT of width {dim}: pass its config")
    image_dim = tuple(shapes["img_emb.proj.0.weight"])[0] if "img_emb.proj.0.weight" in shapes else None
    image_len = next((c.image_len for c in named if c.image_dim == image_dim), 257)
    return WanConfig(
        dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch), patch_size=patch,
        text_len=text_len or default_len, text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1], image_dim=image_dim, image_len=image_len,
    )  # fmt: skip
