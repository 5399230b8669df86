"""Model checkpoints: lazy reading, strict loading, and the Wan2.1 DiT's key layouts.

Reading is lazy. ``open_state_dict`` returns ``{key: LazyTensor}``: shape and dtype come from the
file's header (safetensors: the JSON header; ``torch.save`` files: the pickle, with the data
memory-mapped), the data is read only by ``LazyTensor.load()``. So a checkpoint's complete key and
shape set is checked against the model *before* any weight is read, which makes validating a 14B
checkpoint cost a header parse, and a truncated file is reported from its header (the data it
declares runs past the end of the file) before anything is loaded.

``load_state_dict_strict`` is the one strict loader (DiT, VAE, umT5): the model is built on the meta
device, every missing / unexpected / mis-shaped key is listed in ONE ``ValueError``, then tensors are
read one at a time, cast to the target dtype, moved to the target device and assigned
(``assign=True``): peak memory is the model in its final dtype plus one tensor, never a second full
copy. ``device="meta"`` validates without reading any data (and returns a meta model).

Wan2.1 DiT layouts (our module names ARE the official ones, RCM_METHOD.md §8):

    official   Wan-AI/Wan2.1-T2V-*: one ``diffusion_pytorch_model.safetensors``, or shards with
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
    rcm        released rCM students / reference training checkpoints (``.pt``): official names behind
               ``net.`` (and ``net_ema.``, preferred when present, as the reference loads it), maybe
               with ``_checkpoint_wrapped_module.`` inside, and the patch embedding flattened to
               ``[dim, C·kt·kh·kw]`` (reshaped back to the Conv3d shape).

The layout is detected from the keys. The architecture comes from, in this order: the ``config``
argument, the ``wan_config`` safetensors metadata (written by ``save_dit``), a ``config.json`` beside
the weights (official or diffusers format), or the tensor shapes (``infer_wan_config``; the number
of heads is not in the shapes: a named config of the same width, else head_dim 128 as all Wan2.1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "DIT_LAYOUTS",
    "LazyTensor",
    "LazyStateDict",
    "open_state_dict",
    "read_state_dict",
    "load_state_dict_strict",
    "dit_key_to_diffusers",
    "dit_key_from_diffusers",
    "dit_state_dict_to_diffusers",
    "dit_state_dict_from_diffusers",
    "detect_dit_layout",
    "infer_wan_config",
    "wan_config_from_json",
    "wan_config_to_diffusers",
    "DitFiles",
    "dit_weight_files",
    "read_dit_config",
    "load_dit",
    "save_dit",
]

DIT_LAYOUTS = ("official", "diffusers", "rcm")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header

# ----------------------------------------------------------------------------------------------------
# Lazy tensors and files


class LazyTensor:
    """A tensor stored in a file: ``shape`` and ``dtype`` are known, ``load()`` reads the data (CPU)."""

    __slots__ = ("shape", "dtype", "_read")

    def __init__(self, shape: Iterable[int], dtype: torch.dtype, read: Callable[[], Tensor]):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._read = read

    def load(self) -> Tensor:
        return self._read()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def reshape(self, *shape: int) -> LazyTensor:
        shape = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        if math.prod(shape) != math.prod(self.shape):
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        read = self._read
        return LazyTensor(shape, self.dtype, lambda: read().reshape(shape))

    def __repr__(self) -> str:
        return f"LazyTensor(shape={list(self.shape)}, dtype={self.dtype})"


class LazyStateDict(dict):
    """``{key: LazyTensor}`` with the files' string ``metadata`` and a ``source`` description."""

    def __init__(self, items=(), *, metadata: Mapping[str, str] | None = None, source: str = ""):
        super().__init__(items)
        self.metadata = dict(metadata or {})
        self.source = source


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _corrupt(path: Path, why: str) -> ValueError:
    return ValueError(f"could not read {path}: {why}; the file may be truncated or corrupt")


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], dict[str, str]]:
    """Keys -> (shape, dtype) and the metadata, from the header alone; checks that the file holds all
    the data the header declares (a truncated file fails here, before any tensor is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"bad safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "bad safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    entries, end = {}, 0
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = torch.Size(int(s) for s in info["shape"])
            a, b = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(path, f"bad header entry for {key!r}: {info!r}") from e
        if b - a != math.prod(shape) * dtype.itemsize:
            raise _corrupt(path, f"{key!r}: {b - a} bytes for shape {list(shape)} {dtype}")
        entries[key] = (shape, dtype)
        end = max(end, b)
    if 8 + n + end > size:
        raise _corrupt(path, f"the header declares {8 + n + end} bytes, the file has {size} (truncated)")
    return entries, dict(meta)


class _SafetensorsReader:
    """Opens the file (memory-mapped) at the first read, keeps it open for the next ones."""

    def __init__(self, path: Path):
        self.path, self._handle = path, None

    def __call__(self, key: str) -> Tensor:
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as e:  # safetensors raises its own error type
            raise _corrupt(self.path, f"reading {key!r} failed ({type(e).__name__}: {e})") from e


def _open_safetensors(path: Path) -> LazyStateDict:
    entries, meta = _safetensors_header(path)
    read = _SafetensorsReader(path)
    return LazyStateDict(
        {k: LazyTensor(shape, dtype, lambda k=k: read(k)) for k, (shape, dtype) in entries.items()},
        metadata=meta, source=str(path))  # fmt: skip


def _open_torch(path: Path) -> LazyStateDict:
    try:
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    while isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"{path} does not hold a state dict of tensors: {len(bad)} entries are not tensors "
                         f"({', '.join(bad[:5])})")
    return LazyStateDict({k: LazyTensor(v.shape, v.dtype, lambda v=v: v) for k, v in obj.items()}, source=str(path))


def open_state_dict(paths: str | Path | Sequence[str | Path]) -> LazyStateDict:
    """Lazily opens a ``.safetensors`` file, a ``torch.save`` file (``.pth/.pt/.bin``: weights only,
    memory-mapped) or several safetensors shards (their keys merged; a key in two shards is an error)."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no checkpoint files given")
    out = LazyStateDict(source=", ".join(map(str, files)) if len(files) < 4 else f"{files[0].parent} ({len(files)} shards)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no checkpoint file at {f}")
        part = _open_safetensors(f) if f.suffix == ".safetensors" else _open_torch(f)
        dup = sorted(set(part) & set(out))
        if dup:
            raise ValueError(f"{f}: keys also in another shard: {', '.join(dup[:5])}")
        out.update(part)
        out.metadata.update(part.metadata)
    return out


def read_state_dict(path: str | Path | Sequence[str | Path], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Reads a whole state dict (``open_state_dict`` then every tensor), on ``device`` (default CPU)."""
    return {k: v.load() if device is None else v.load().to(device) for k, v in open_state_dict(path).items()}


# ----------------------------------------------------------------------------------------------------
# Strict loading


def load_state_dict_strict(
    model: nn.Module,
    state_dict: Mapping[str, Tensor | LazyTensor],
    *,
    what: str,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rename_for_report: Callable[[str], str] = lambda k: k,
) -> nn.Module:
    """Checks ``state_dict`` (tensors or ``LazyTensor``s) against ``model`` (which may live on the meta
    device) and loads it with ``assign=True``, casting floating tensors to ``dtype`` and moving them to
    ``device``. Missing, unexpected and shape-mismatched keys are all listed in one ``ValueError``
    (named through ``rename_for_report``, i.e. as the file spells them), before any data is read.
    Lazy tensors are read one at a time (peak: the model plus one tensor) and always copied, so the
    model never aliases a memory-mapped file. ``device="meta"`` checks without reading."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        (k, tuple(state_dict[k].shape), expected[k])
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:

        def listing(title, items, note=""):
            if not items:
                return []
            shown = [f"    {x}" for x in items[:20]]
            if len(items) > 20:
                shown.append(f"    ... and {len(items) - 20} more")
            return [f"  {title} ({len(items)}{note}):", *shown]

        lines = [f"{what} checkpoint {source} does not match the model:"]
        lines += listing("missing keys", sorted(rename_for_report(k) for k in missing))
        lines += listing("unexpected keys", sorted(rename_for_report(k) for k in unexpected))
        lines += listing(
            "shape mismatches",
            sorted(f"{rename_for_report(k)}: {list(a)} vs {list(b)}" for k, a, b in mismatched),
            note=", file vs model",
        )
        if mismatched:
            lines.append("  (shape mismatches usually mean another architecture: check the config)")
        raise ValueError("\n".join(lines))

    meta = device is not None and torch.device(device).type == "meta"

    def prepare(t: Tensor | LazyTensor) -> Tensor:
        target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        if meta:
            return torch.empty(t.shape, dtype=target, device="meta")
        if isinstance(t, LazyTensor):
            return t.load().to(device=device, dtype=target, copy=True)
        return t.to(device=device, dtype=target)

    loaded = {}
    for k in list(state_dict):
        loaded[k] = prepare(state_dict[k])
    model.load_state_dict(loaded, strict=True, assign=True)
    return model


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
]
_DIT_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q.", "attn1.norm_q."), ("self_attn.norm_k.", "attn1.norm_k."),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q.", "attn2.norm_q."), ("cross_attn.norm_k.", "attn2.norm_k."),
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


def _rename(sd: Mapping, fn: Callable[[str], str], what: str) -> dict:
    out = {}
    for k, v in sd.items():
        new = fn(k)
        if new in out:
            raise ValueError(f"two {what} keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    return out


def dit_state_dict_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official (= our) Wan DiT state dict -> ``diffusers.WanTransformer3DModel`` names (same tensors)."""
    return _rename(sd, dit_key_to_diffusers, "Wan DiT")


def dit_state_dict_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``diffusers.WanTransformer3DModel`` state dict -> official (= our) names (same tensors)."""
    return _rename(sd, dit_key_from_diffusers, "Wan DiT")


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
    raise ValueError(f"not a Wan2.1 DiT checkpoint (unrecognized keys: {sample})")


def _select_rcm(sd: Mapping, ema: bool | None, source: str) -> tuple[dict, str]:
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


def _wan_classes():
    from .wan import WAN_CONFIGS, WanConfig

    return WAN_CONFIGS, WanConfig


def wan_config_from_json(cfg: Mapping) -> WanConfig:  # noqa: F821 (WanConfig: lazy import)
    """A ``WanConfig`` from a dict: ours (``asdict``, as ``save_dit`` writes it), an official Wan2.1
    ``config.json`` (``dim``, ``num_heads``, ``model_type`` ...), or a diffusers
    ``WanTransformer3DModel`` ``config.json`` (``num_attention_heads`` ...). T2V only."""
    _, WanConfig = _wan_classes()
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    if "num_attention_heads" in cfg:  # diffusers
        unsupported = {k: cfg.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len") if cfg.get(k)}
        if cfg.get("cross_attn_norm") is False:
            unsupported["cross_attn_norm"] = False
        if cfg.get("qk_norm") not in (None, "rms_norm_across_heads"):
            unsupported["qk_norm"] = cfg.get("qk_norm")
        if unsupported:
            raise ValueError(f"not a Wan2.1 T2V transformer config (unsupported: {unsupported})")
        kw = dict(dim=cfg["num_attention_heads"] * cfg["attention_head_dim"], num_heads=cfg["num_attention_heads"],
                  ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"])
        for ours, theirs in [("in_dim", "in_channels"), ("out_dim", "out_channels"), ("text_dim", "text_dim"),
                             ("freq_dim", "freq_dim"), ("eps", "eps"), ("patch_size", "patch_size"),
                             ("rope_max_len", "rope_max_seq_len")]:
            if cfg.get(theirs) is not None:
                kw[ours] = cfg[theirs]
    else:  # ours or official
        if cfg.get("model_type", "t2v") != "t2v":
            raise ValueError(f"not a Wan2.1 T2V config (model_type={cfg.get('model_type')!r}); only t2v is supported")
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
        "eps": config.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": config.rope_max_len,
    }  # fmt: skip


def infer_wan_config(shapes: Mapping[str, Sequence[int]], *, text_len: int | None = None):
    """The ``WanConfig`` of an official-named state dict, from its shapes (``{key: shape}``).

    Everything but the number of heads and ``text_len`` is in the shapes. Heads: a named config of the
    same ``dim`` and ``ffn_dim`` (1.3B: 12, 14B: 40), else head_dim 128 (every Wan2.1 model).
    ``text_len``: the named config's, else 512 (Wan's umT5 length)."""
    WAN_CONFIGS, WanConfig = _wan_classes()
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
    return WanConfig(
        dim=dim, ffn_dim=ffn_dim, num_heads=num_heads, num_layers=num_layers, in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch), patch_size=patch,
        text_len=text_len or default_len, text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
    )  # fmt: skip


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
            raise _corrupt(path, f"not a shard index ({type(e).__name__}: {e})") from e
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
            self.state_dict, prefix = _select_rcm(raw, ema, self.source)
            self.report = lambda k: k.replace("<unprefixed>", "") if k.startswith("<unprefixed>") else prefix + k
        self.config_json = json.loads(config_json.read_text()) if config_json is not None else None

    def config(self, text_len: int | None = None):
        if "wan_config" in self.metadata:
            return wan_config_from_json(json.loads(self.metadata["wan_config"]))
        if self.config_json is not None and ("dim" in self.config_json or "num_attention_heads" in self.config_json):
            return wan_config_from_json(self.config_json if text_len is None else {**self.config_json, "text_len": text_len})
        return infer_wan_config({k: v.shape for k, v in self.state_dict.items()}, text_len=text_len)


def read_dit_config(path: str | Path, *, ema: bool | None = None):
    """The ``WanConfig`` that ``load_dit(path)`` would build (metadata, config.json or shapes); reads
    headers only."""
    return _DitCheckpoint(path, ema).config()


def load_dit(
    path: str | Path,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    ema: bool | None = None,
):
    """Loads a Wan2.1 DiT (``WanDiT``) from any layout (official / diffusers / rCM; see the module doc).

    ``config``: the architecture (default: recorded in the files or inferred from the shapes).
    ``dtype``: of the floating parameters (default bf16 on CUDA, fp32 elsewhere). ``device``: where
    the weights go; ``"meta"`` validates keys and shapes from the headers without reading any data.
    ``ema``: for rCM checkpoints, ``net_ema.`` (True), ``net.`` (False) or ``net_ema.`` if present (None).
    Strict: one ``ValueError`` lists all missing / unexpected / mis-shaped keys (named as in the file);
    a truncated or corrupt file is a ``ValueError``, a missing one ``FileNotFoundError``."""
    from .wan import WanDiT

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
        save_file({k: v.contiguous().cpu() for k, v in sd.items()}, str(path), metadata=meta)
        return [path]
    path.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        cfg_json = {"_class_name": "WanTransformer3DModel", **wan_config_to_diffusers(config)}
    else:
        cfg_json = {"_class_name": "WanModel", "model_type": "t2v", **dataclasses.asdict(config)}
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
