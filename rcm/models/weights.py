"""Generic weight files: lazy reading and strict loading, for every model family (DiT, VAE, umT5).

Reading is lazy. ``open_state_dict`` returns ``{key: LazyTensor}``: shape and dtype come from the
file's header (safetensors: the JSON header; ``torch.save`` files: the pickle, with the data
memory-mapped), the data is read only by ``LazyTensor.load()``. So a checkpoint's complete key and
shape set is checked against the model *before* any weight is read, which makes validating a 14B
checkpoint cost a header parse, and a truncated file is reported from its header (the data it
declares runs past the end of the file) before anything is loaded.

``load_state_dict_strict`` is the one strict loader: the model is built on the meta device, every
missing / unexpected / mis-shaped key is listed in ONE ``ValueError``, then tensors are read one at a
time, cast to the target dtype, moved to the target device and assigned (``assign=True``): peak
memory is the model in its final dtype plus one tensor, never a second full copy. ``device="meta"``
validates without reading any data (and returns a meta model).

Key names are a family's business: each family's state-dict adapter (``rcm.models.wan_layouts`` for
the Wan DiT) maps its file layouts to module names before calling the strict loader, and passes
``rename_for_report`` so errors name keys as the file spells them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "LazyStateDict",
    "LazyTensor",
    "corrupt_file_error",
    "load_state_dict_strict",
    "open_state_dict",
    "read_state_dict",
    "rename_keys",
]

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


def corrupt_file_error(path: Path, why: str) -> ValueError:
    """The one error for an unreadable weight file (truncated, corrupt, not what it claims)."""
    return ValueError(f"could not read {path}: {why}; the file may be truncated or corrupt")


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[torch.Size, torch.dtype]], dict[str, str]]:
    """Keys -> (shape, dtype) and the metadata, from the header alone; checks that the file holds all
    the data the header declares (a truncated file fails here, before any tensor is read)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt_file_error(path, f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise corrupt_file_error(path, f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt_file_error(path, f"bad safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise corrupt_file_error(path, "bad safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    entries, end = {}, 0
    for key, info in header.items():
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = torch.Size(int(s) for s in info["shape"])
            a, b = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt_file_error(path, f"bad header entry for {key!r}: {info!r}") from e
        if b - a != math.prod(shape) * dtype.itemsize:
            raise corrupt_file_error(path, f"{key!r}: {b - a} bytes for shape {list(shape)} {dtype}")
        entries[key] = (shape, dtype)
        end = max(end, b)
    if 8 + n + end > size:
        raise corrupt_file_error(path, f"the header declares {8 + n + end} bytes, the file has {size} (truncated)")
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
            raise corrupt_file_error(self.path, f"reading {key!r} failed ({type(e).__name__}: {e})") from e


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
        raise corrupt_file_error(path, f"{type(e).__name__}: {e}") from e
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
    floating = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    # an integer (or bool) tensor where the model holds floats would be assigned as is and fail far later
    wrong_dtype = sorted(f"{k}: {state_dict[k].dtype}" for k in floating
                         if k in state_dict and not state_dict[k].is_floating_point())
    if missing or unexpected or mismatched or wrong_dtype:

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
        lines += listing("not floating point", wrong_dtype, note=", the model's weights are")
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


def rename_keys(sd: Mapping, fn: Callable[[str], str], what: str) -> dict:
    """``{fn(k): v}``; two keys mapping to one name is an error (a wrong key map must not hide weights)."""
    out = {}
    for k, v in sd.items():
        new = fn(k)
        if new in out:
            raise ValueError(f"two {what} keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    return out
