"""Wan latent datasets: what `rcm synth` writes and `rcm distill wan2.1-*` reads.

A dataset folder holds
    index.json                   format, latent shape, text_dim, sample count, shard names, settings
    shard_00000.safetensors ...  N samples each: "latents" [N, C, T, h, w] (fp32 or bf16), "embeds"
                                 [sum of prompt lengths, text_dim] (each prompt's umT5 rows, trimmed at
                                 its length), "lengths" [N] int64; metadata "prompts" (a JSON list)
    negative.safetensors         "embed" [length, text_dim]: the CFG negative prompt, encoded once
An image-to-video dataset (index "i2v": "frame" or "channels", docs/i2v.md) adds per sample, in each
shard: "images" [N, 3, H, W] uint8 (the first frames given) and, for DiTs that take the image as
channels, "y" [N, cond_dim, T, h, w] (mask ++ the latent of "image, then black frames") and, for Wan2.1
I2V, "image_context" [N, image_len, image_dim] (CLIP tokens). Frame replacement (TI2V) needs nothing
more: a latent's first frame is its image's latent.
The reference's webdataset tars (members <key>.latent.pt, <key>.embed.pt [512, 4096] zero-padded,
<key>.prompt.txt) are read directly too: a folder of .tar files, or .tar shards listed in index.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rcm import PathArgumentError


LATENT_FORMAT = "rcm-wan-latents-v1"
CONDITIONING_KEYS = ("y", "image_context", "images")  # an I2V shard's per-sample conditioning tensors
TRAINING_INPUTS = ("y", "image_context")  # what a training batch passes to the DiT (FrameCondition.inputs)
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
                 extra_metadata: dict | None = None, conditioning: dict[str, torch.Tensor] | None = None) -> bytes:
    """One shard's safetensors bytes (see the layout above; ``conditioning``: an I2V shard's tensors, one
    row per sample); written with an atomic rename by the caller."""
    import json

    from safetensors.torch import save

    if not (len(latents) == len(embeds) == len(prompts)) or len(prompts) == 0:
        raise ValueError(f"a shard needs as many latents, embeddings and prompts (>= 1), got "
                         f"{len(latents)}, {len(embeds)}, {len(prompts)}")
    tensors = {"latents": latents.contiguous().cpu(),
               "embeds": torch.cat([e.cpu() for e in embeds]).contiguous(),
               "lengths": torch.tensor([e.shape[0] for e in embeds], dtype=torch.int64)}
    for key, value in (conditioning or {}).items():
        if key not in CONDITIONING_KEYS or len(value) != len(prompts):
            raise ValueError(f"conditioning {key!r}: expected one of {CONDITIONING_KEYS} with {len(prompts)} rows, "
                             f"got {tuple(value.shape)}")
        tensors[key] = value.contiguous().cpu()
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

        from rcm.models import open_state_dict

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
        self.conditioning_keys = tuple(k for k in CONDITIONING_KEYS if k in header)
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

    def conditioning(self, j: int) -> dict[str, torch.Tensor]:
        """Sample ``j``'s I2V tensors (``CONDITIONING_KEYS`` present in the shard; {} for T2V)."""
        self[j]  # opens the file
        return {k: self._handle.get_slice(k)[j : j + 1][0] for k in self.conditioning_keys}


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

    def conditioning(self, j: int) -> dict[str, torch.Tensor]:
        return {}  # the reference's tars are text-to-video

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
            raise PathArgumentError("data", f"no dataset folder at {path}")
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
                                        f"(the reference's webdataset); write one with `rcm synth --out-dir {path}` and a source "
                                        f"(--prompts with --teacher, --videos or --latents: `rcm synth --help`)")
        if not files:
            raise ValueError(f"{path}: the dataset has no shards")
        self.shards = [_open_shard(f) for f in files]
        shapes = {s.latent_shape for s in self.shards}
        dims = {s.text_dim for s in self.shards}
        if len(shapes) > 1 or len(dims) > 1:
            raise ValueError(f"{path}: shards disagree on the latent shape {sorted(shapes)} or text width {sorted(dims)}")
        self.latent_shape, self.text_dim = shapes.pop(), dims.pop()
        self.i2v: str | None = self.index.get("i2v")  # "frame", "channels" or None (text to video)
        if self.i2v == "channels" and any("y" not in s.conditioning_keys for s in self.shards):
            raise ValueError(f"{path}: an image-to-video (channels) dataset whose shards lack the 'y' conditioning")
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

    def conditioning(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i``'s image-to-video tensors ({} in a text-to-video dataset)."""
        import bisect

        s = bisect.bisect_right(self.starts, i) - 1
        return self.shards[s].conditioning(i - self.starts[s])


class LatentBatches:
    """Infinite, seeded, resumable batches ``(x0 [B, C, T', h, w] float32, context [B, text_len, D]
    float32)`` from a ``LatentDataset``; of an image-to-video dataset ``(x0, context, inputs)``, ``inputs``
    its ``TRAINING_INPUTS`` stacked ({} under frame replacement: x0's first frame is the image's).

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

    def __next__(self) -> tuple[torch.Tensor, ...]:
        indices = self.indices()
        samples = [self.dataset[i] for i in indices]
        x0 = torch.stack([s[0] for s in samples]).float()
        if self.max_frames is not None:
            x0 = x0[:, :, : self.max_frames]
        context = pad_embeddings([s[1] for s in samples], self.text_len)
        if self.dataset.i2v is None:
            return x0, context
        rows = [self.dataset.conditioning(i) for i in indices]
        inputs = {k: torch.stack([r[k] for r in rows]).float() for k in TRAINING_INPUTS if k in rows[0]}
        if "y" in inputs:
            inputs["y"] = inputs["y"][:, :, : x0.shape[2]]  # the latent frames kept
        return x0, context, inputs

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size", len(self.dataset)) != len(self.dataset):
            raise ValueError(f"the saved data position is for a dataset of {state['size']} samples; "
                             f"{self.dataset.path} has {len(self.dataset)}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
