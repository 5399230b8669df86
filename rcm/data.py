"""Moving-digit video clips: the embedded default's data, made from scikit-learn's bundled digits.

Each clip shows one real 8×8 handwritten digit (``sklearn.datasets.load_digits``, 1,797 images,
no download) gliding across a ``size×size`` canvas for ``frames`` frames with constant velocity,
bouncing off the walls. Positions are continuous; the digit is placed with bilinear interpolation,
so the motion is smooth at sub-pixel speed. The label is the digit.

Layout for the models: ``[N, C=1, T, H, W]`` float32, background −1, ink up to +1.

Split: a fixed, class-stratified split *by source image* (``TEST_FRACTION`` of each class held out,
independent of any data seed), so train and test clips never share a handwritten digit.

Everything random is drawn from an explicit ``torch.Generator``:
- ``sample_clips(split, n, generator)``: a fresh batch;
- ``DigitClips(split, n, seed)``: a fixed, reproducible set (e.g. the held-out reference set);
- ``ClipBatches(split, batch_size, seed)``: an infinite training iterator whose position
  (``state_dict()`` / ``load_state_dict()``) can be saved and restored for exact resume.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

NUM_CLASSES = 10
DIGIT_SIZE = 8
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split is part of the dataset's definition, not of a run


@dataclass(frozen=True)
class ClipSpec:
    """Shape and motion of the clips."""

    frames: int = 8
    size: int = 16
    min_speed: float = 0.5  # pixels per frame
    max_speed: float = 1.5

    def __post_init__(self):
        if self.size < DIGIT_SIZE:
            raise ValueError(f"canvas size {self.size} is smaller than a digit ({DIGIT_SIZE})")
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if not 0 <= self.min_speed <= self.max_speed:
            raise ValueError(f"need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Per-clip shape ``(C, T, H, W)``."""
        return (1, self.frames, self.size, self.size)


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
    labels = torch.tensor(d.target, dtype=torch.long)
    return images, labels


@functools.lru_cache(maxsize=None)
def split_indices(split: str) -> torch.Tensor:
    """Indices into ``load_digits()`` of the source images of ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    _, labels = _all_digits()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    test = []
    for c in range(NUM_CLASSES):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[: round(TEST_FRACTION * len(idx))])
    test = torch.cat(test).sort().values
    if split == "test":
        return test
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().flatten()


def digit_images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 8, 8] in [0, 1], labels [N])`` of the source digits of ``split``."""
    images, labels = _all_digits()
    idx = split_indices(split)
    return images[idx], labels[idx]


def bounce(p: torch.Tensor, hi: float) -> torch.Tensor:
    """Reflect positions into ``[0, hi]`` (a triangle wave: constant speed, elastic walls)."""
    if hi <= 0:
        return torch.zeros_like(p)
    m = torch.remainder(p, 2 * hi)
    return torch.where(m <= hi, m, 2 * hi - m)


def render_clips(digits: torch.Tensor, start: torch.Tensor, velocity: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """Render clips ``[N, 1, T, H, W]`` in [-1, 1].

    digits: ``[N, 8, 8]`` in [0, 1]; start, velocity: ``[N, 2]`` as (y, x) in pixels and pixels/frame.
    The digit's top-left corner is at ``bounce(start + t·velocity)``, placed bilinearly.
    """
    n, t_len, s = digits.shape[0], spec.frames, spec.size
    hi = float(s - DIGIT_SIZE)
    t = torch.arange(t_len, dtype=torch.float32)
    pos = bounce(start[:, None, :] + t[None, :, None] * velocity[:, None, :], hi)  # [N, T, 2]
    pix = torch.arange(s, dtype=torch.float32)
    # sample the digit at canvas pixel minus position, in the digit's own pixel coordinates
    v = pix[None, None, :] - pos[..., 0:1]  # [N, T, S] (rows)
    u = pix[None, None, :] - pos[..., 1:2]  # [N, T, S] (cols)
    grid = torch.stack(torch.broadcast_tensors(u[:, :, None, :], v[:, :, :, None]), dim=-1)  # [N,T,S,S,2]=(x,y)
    grid = grid / (DIGIT_SIZE - 1) * 2 - 1  # align_corners=True normalisation
    src = digits[:, None].expand(n, t_len, DIGIT_SIZE, DIGIT_SIZE).reshape(n * t_len, 1, DIGIT_SIZE, DIGIT_SIZE)
    out = F.grid_sample(src, grid.reshape(n * t_len, s, s, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return (out.reshape(n, 1, t_len, s, s) * 2 - 1).clamp(-1, 1)


def sample_clips(
    split: str,
    n: int,
    generator: torch.Generator,
    spec: ClipSpec = ClipSpec(),
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` clips ``[n, 1, T, H, W]`` and their labels ``[n]`` from ``split``.

    Source images are drawn uniformly from the split, or, if ``labels`` is given, uniformly among
    the split's images of each requested class. Start position, speed and direction are uniform.
    """
    images, image_labels = digit_images(split)
    if labels is None:
        idx = torch.randint(len(images), (n,), generator=generator)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {labels.min()}..{labels.max()}")
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.empty(n, dtype=torch.long)
        for c in range(NUM_CLASSES):
            pool = (image_labels == c).nonzero().flatten()
            sel = labels == c
            idx[sel] = pool[(u[sel] * len(pool)).long().clamp_max(len(pool) - 1)]
    hi = spec.size - DIGIT_SIZE
    start = torch.rand(n, 2, generator=generator) * hi
    speed = spec.min_speed + (spec.max_speed - spec.min_speed) * torch.rand(n, generator=generator)
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    velocity = speed[:, None] * torch.stack([torch.sin(angle), torch.cos(angle)], dim=1)
    return render_clips(images[idx], start, velocity, spec), image_labels[idx]


class DigitClips(torch.utils.data.Dataset):
    """A fixed, reproducible set of ``n`` clips of ``split`` (class-balanced if ``balanced``)."""

    def __init__(self, split: str = "test", n: int = 1000, seed: int = 0, spec: ClipSpec = ClipSpec(), balanced: bool = True):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % NUM_CLASSES if balanced else None
        self.split, self.seed, self.spec = split, seed, spec
        self.clips, self.labels = sample_clips(split, n, g, spec, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.clips[i], self.labels[i]


class ClipBatches:
    """Infinite iterator of training batches ``(clips [B,1,T,H,W], labels [B])``.

    All randomness comes from one ``torch.Generator`` seeded with ``seed``; ``state_dict()``
    captures its state and the step count, so a resumed run sees exactly the same batches.
    """

    def __init__(self, split: str = "train", batch_size: int = 32, seed: int = 0, spec: ClipSpec = ClipSpec()):
        self.split, self.batch_size, self.spec = split, batch_size, spec
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = sample_clips(self.split, self.batch_size, self.generator, self.spec)
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def to_unit(clips: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] → display range [0, 1] (clamped)."""
    return ((clips + 1) / 2).clamp(0, 1)


def clip_grid(clips: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4):
    """A uint8 image ``[H', W']`` (numpy) of clips ``[N, 1, T, H, W]`` in [-1, 1]: one clip per row,
    frames left to right (``nrow`` clips per row-block if given, blocks side by side), each pixel
    ``scale``×``scale``, separated by ``pad`` grey pixels."""
    x = to_unit(clips.detach().float().cpu())[:, 0]  # [N, T, H, W]
    n, t, h, w = x.shape
    nrow = nrow or n
    ncol_blocks = math.ceil(n / nrow)
    cell_h, cell_w = h + pad, w + pad
    block_w = t * cell_w + pad
    img = torch.full((nrow * cell_h + pad, ncol_blocks * block_w + pad), 0.5)
    for i in range(n):
        r, b = i % nrow, i // nrow
        for j in range(t):
            y0, x0 = pad + r * cell_h, b * block_w + pad + j * cell_w
            img[y0 : y0 + h, x0 : x0 + w] = x[i, j]
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return (img * 255).round().to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------------------
# Wan latent datasets: what `rcm synth` writes and `rcm distill wan2.1-*` reads.
#
# A dataset folder holds
#     index.json                   format, latent shape, text_dim, sample count, shard names, settings
#     shard_00000.safetensors ...  N samples each: "latents" [N, C, T, h, w] (fp32 or bf16), "embeds"
#                                  [sum of prompt lengths, text_dim] (each prompt's umT5 rows, trimmed at
#                                  its length), "lengths" [N] int64; metadata "prompts" (a JSON list)
#     negative.safetensors         "embed" [length, text_dim]: the CFG negative prompt, encoded once
# The reference's webdataset tars (members <key>.latent.pt, <key>.embed.pt [512, 4096] zero-padded,
# <key>.prompt.txt) are read directly too: a folder of .tar files, or .tar shards listed in index.json.

LATENT_FORMAT = "rcm-wan-latents-v1"
INDEX_NAME = "index.json"
NEGATIVE_NAME = "negative.safetensors"


def trim_embedding(embed: torch.Tensor) -> torch.Tensor:
    """umT5 rows ``[text_len, D]`` zero-padded past the prompt -> the prompt's rows ``[length, D]``
    (length = last non-zero row + 1; at least one row, so an all-zero embedding keeps one)."""
    if embed.ndim != 2:
        raise ValueError(f"a text embedding must be [text_len, dim], got shape {tuple(embed.shape)}")
    nonzero = (embed != 0).any(dim=1).nonzero()
    length = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return embed[:length]


def pad_embeddings(embeds: list[torch.Tensor], text_len: int) -> torch.Tensor:
    """Trimmed embeddings ``[length_i, D]`` -> ``[B, text_len, D]`` float32, zeros past each length
    (what the DiT was trained on: official Wan pads umT5's output with zeros, no mask)."""
    dim = embeds[0].shape[1]
    out = torch.zeros(len(embeds), text_len, dim, dtype=torch.float32)
    for i, e in enumerate(embeds):
        if e.shape[0] > text_len:
            raise ValueError(f"a text embedding has {e.shape[0]} tokens, more than the model's text_len {text_len}")
        out[i, : e.shape[0]] = e.float()
    return out


def encode_shard(latents: torch.Tensor, embeds: list[torch.Tensor], prompts: list[str],
                 extra_metadata: dict | None = None) -> bytes:
    """One shard's safetensors bytes (see the layout above); written with an atomic rename by the caller."""
    import json

    from safetensors.torch import save

    if not (len(latents) == len(embeds) == len(prompts)) or len(prompts) == 0:
        raise ValueError(f"a shard needs as many latents, embeddings and prompts (>= 1), got "
                         f"{len(latents)}, {len(embeds)}, {len(prompts)}")
    tensors = {"latents": latents.contiguous().cpu(),
               "embeds": torch.cat([e.cpu() for e in embeds]).contiguous(),
               "lengths": torch.tensor([e.shape[0] for e in embeds], dtype=torch.int64)}
    meta = {"format": LATENT_FORMAT, "prompts": json.dumps(prompts, ensure_ascii=False),
            **{k: str(v) for k, v in (extra_metadata or {}).items()}}
    return save(tensors, metadata=meta)


def _load_pt(data: bytes, what: str) -> torch.Tensor:
    import io

    try:
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt member
        raise ValueError(f"{what}: not a torch tensor file ({type(e).__name__}: {e})") from e
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor, got {type(value).__name__}")
    return value


class _SafetensorsShard:
    """Random access to one of our shards (memory-mapped; one sample read at a time)."""

    def __init__(self, path: Path):
        import json

        from rcm.models.checkpoint import open_state_dict

        header = open_state_dict(path)  # header only: a truncated file fails here, naming it
        missing = [k for k in ("latents", "embeds", "lengths") if k not in header]
        if missing or header.metadata.get("format") != LATENT_FORMAT:
            raise ValueError(f"{path} is not an rcm latent shard (format {header.metadata.get('format')!r}, "
                             f"missing {missing})")
        self.path = path
        self.prompts = json.loads(header.metadata["prompts"])
        self.lengths = header["lengths"].load()
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])
        self.latent_shape = tuple(header["latents"].shape[1:])
        self.text_dim = header["embeds"].shape[1]
        self._handle = None
        if len(self.prompts) != header["latents"].shape[0] or len(self.lengths) != len(self.prompts):
            raise ValueError(f"{path}: {header['latents'].shape[0]} latents, {len(self.lengths)} lengths and "
                             f"{len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        from safetensors import safe_open

        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        latent = self._handle.get_slice("latents")[j : j + 1][0]
        a, b = int(self.offsets[j]), int(self.offsets[j + 1])
        return latent, self._handle.get_slice("embeds")[a:b], self.prompts[j]


class _TarShard:
    """Random access to a reference webdataset tar (members ``<key>.latent.pt``, ``<key>.embed.pt``,
    ``<key>.prompt.txt``); the member table is read once, samples on demand."""

    def __init__(self, path: Path):
        import tarfile

        self.path = path
        try:
            with tarfile.open(path, "r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path}: not a readable tar file ({e})") from e
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            folder, _, base = m.name.rpartition("/")
            if m.isfile() and "." in base:  # webdataset: the key is the name up to the basename's first dot
                stem, _, ext = base.partition(".")
                groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext] = m
        self.keys = sorted(k for k, g in groups.items() if {"latent.pt", "embed.pt"} <= set(g))
        if not self.keys:
            raise ValueError(f"{path}: no samples with latent.pt and embed.pt members (the reference's webdataset layout)")
        self.groups = groups
        self._tar = None
        first = self[0]
        self.latent_shape, self.text_dim = tuple(first[0].shape), first[1].shape[1]

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, member) -> bytes:
        import tarfile

        if self._tar is None:
            self._tar = tarfile.open(self.path, "r:")
        return self._tar.extractfile(member).read()

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        group = self.groups[self.keys[j]]
        what = f"{self.path}:{self.keys[j]}"
        latent = _load_pt(self._read(group["latent.pt"]), what + ".latent.pt")
        if latent.ndim == 5 and latent.shape[0] == 1:  # saved with its batch dimension
            latent = latent[0]
        embed = _load_pt(self._read(group["embed.pt"]), what + ".embed.pt")
        if embed.ndim == 3 and embed.shape[0] == 1:
            embed = embed[0]
        if latent.ndim != 4 or embed.ndim != 2:
            raise ValueError(f"{what}: latent must be [C, T, h, w] and embed [text_len, dim], got "
                             f"{tuple(latent.shape)} and {tuple(embed.shape)}")
        prompt = self._read(group["prompt.txt"]).decode("utf-8").strip() if "prompt.txt" in group else ""
        return latent, trim_embedding(embed), prompt


def _open_shard(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"latent shard {path} is missing")
    return _TarShard(path) if path.suffix == ".tar" else _SafetensorsShard(path)


class LatentDataset:
    """A Wan latent dataset: our folder (``index.json`` + shards + ``negative.safetensors``) or a folder
    of the reference's webdataset tars. ``dataset[i] -> (latent [C, T, h, w], embedding [length, D],
    prompt)`` in a fixed order (shards by name, samples in shard order); ``negative`` is the stored
    negative-prompt embedding ``[length, D]`` or None (tars carry none)."""

    def __init__(self, path: str | Path):
        import json

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"--data: no dataset folder at {path}")
        index_path = path / INDEX_NAME
        self.path = path
        self.index: dict = {}
        if index_path.is_file():
            try:
                self.index = json.loads(index_path.read_text())
                names = list(self.index["shards"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: not a dataset index ({type(e).__name__}: {e})") from e
            if self.index.get("format") != LATENT_FORMAT:
                raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected {LATENT_FORMAT!r}")
            files = [path / n for n in names]
        else:
            files = sorted(path.glob("*.tar"))
            if not files:
                raise FileNotFoundError(f"{path}: no {INDEX_NAME} (an `rcm synth` dataset) and no .tar shards "
                                        f"(the reference's webdataset)")
        if not files:
            raise ValueError(f"{path}: the dataset has no shards")
        self.shards = [_open_shard(f) for f in files]
        shapes = {s.latent_shape for s in self.shards}
        dims = {s.text_dim for s in self.shards}
        if len(shapes) > 1 or len(dims) > 1:
            raise ValueError(f"{path}: shards disagree on the latent shape {sorted(shapes)} or text width {sorted(dims)}")
        self.latent_shape, self.text_dim = shapes.pop(), dims.pop()
        self.starts = [0]
        for s in self.shards:
            self.starts.append(self.starts[-1] + len(s))
        negative = path / NEGATIVE_NAME
        self.negative = None
        if negative.is_file():
            from safetensors.torch import load_file

            self.negative = load_file(str(negative))["embed"]

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        import bisect

        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a dataset of {len(self)}")
        s = bisect.bisect_right(self.starts, i) - 1
        return self.shards[s][i - self.starts[s]]


class LatentBatches:
    """Infinite, seeded, resumable batches ``(x0 [B, C, T', h, w] float32, context [B, text_len, D]
    float32)`` from a ``LatentDataset``.

    Samples come in epochs; epoch ``e`` is a permutation drawn from ``seed + e``. Data-parallel rank
    ``r`` of ``world`` takes samples ``r, r + world, ...`` of each global batch of ``world · B`` (ranks
    of one context-parallel group pass the same rank and so read the same batch). ``max_frames``
    keeps the first latent frames (the 1.3B run trains on 20 of 21). ``state_dict()`` is the position
    (epoch, offset), so a resumed run continues with exactly the batches it would have seen."""

    def __init__(self, dataset: LatentDataset, batch_size: int, text_len: int, seed: int = 0,
                 max_frames: int | None = None, rank: int = 0, world: int = 1):
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world, got {batch_size}, {rank}, {world}")
        self.dataset, self.batch_size, self.text_len = dataset, batch_size, text_len
        self.seed, self.max_frames, self.rank, self.world = seed, max_frames, rank, world
        self.epoch, self.offset = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=g))
        return self._perm[1]

    def _take(self, n: int) -> list[int]:
        """The next ``n`` sample indices of the shuffled stream (crossing epochs as needed)."""
        out = []
        while len(out) < n:
            perm = self._permutation(self.epoch)
            k = min(n - len(out), len(perm) - self.offset)
            out += perm[self.offset : self.offset + k].tolist()
            self.offset += k
            if self.offset == len(perm):
                self.epoch, self.offset = self.epoch + 1, 0
        return out

    def indices(self) -> list[int]:
        """This rank's sample indices of the next global batch (advances the position)."""
        return self._take(self.batch_size * self.world)[self.rank :: self.world]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [self.dataset[i] for i in self.indices()]
        x0 = torch.stack([s[0] for s in samples]).float()
        if self.max_frames is not None:
            x0 = x0[:, :, : self.max_frames]
        return x0, pad_embeddings([s[1] for s in samples], self.text_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"the saved data position is for a dataset of {state['size']} samples; "
                             f"{self.dataset.path} has {len(self.dataset)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
