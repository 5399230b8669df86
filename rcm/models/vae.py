"""The Wan2.1 video VAE: causal 3-D convolutions, 8x spatial and 4x temporal compression, 16 channels.

A video ``[B, 3, T, H, W]`` in [-1, 1] with ``T = 1 + 4k`` frames and ``H, W`` multiples of 8 maps to a
latent ``[B, 16, 1 + k, H/8, W/8]``. Frame 0 is coded on its own (it is an image); every later group of
4 frames becomes one latent frame.

Everything is causal in time: a convolution sees the current frame and earlier ones (its kernel is
zero-padded in front only), normalization is over channels, attention is within a frame. So a video
can be processed in chunks of frames, carrying a small ``cache`` from one chunk to the next (the last
frames each temporal convolution saw), and the result equals processing the whole clip at once. Wan
processes the first frame, then 4 frames at a time; ``chunk_size`` picks how many latent frames go in
one chunk (memory is bounded by the chunk, not the video), ``None`` does the whole clip in one pass.

The two temporal resamplers treat the first frame specially, which is what makes the code causal
and frame 0 an image:
* ``Downsample`` (encoder): out[0] = x[0]; out[j] = conv(x[2j-2], x[2j-1], x[2j]) for j >= 1.
* ``Upsample`` (decoder): frame 0 is passed through; every later frame becomes 2 frames, from a causal
  conv over frames 1, 2, ... only (frame 0 is not in its receptive field).

Latents are normalized per channel with Wan's constants: ``encode`` returns ``(mu - mean) / std`` and
``decode`` undoes it. The posterior's log-variance is not used (Wan encodes with the mean).

Parameter names are ours; ``vae_state_dict_from_official`` / ``vae_state_dict_from_diffusers`` and their
inverses rename keys (shapes are identical in all three layouts). ``load_vae`` reads the official
``Wan2.1_VAE.pth`` or a diffusers ``vae/`` folder, strictly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import load_state_dict_strict, read_state_dict

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WanVAEConfig",
    "WanVAE",
    "load_vae",
    "vae_state_dict_from_official",
    "vae_state_dict_to_official",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
    "save_vae",
    "detect_vae_layout",
    "read_state_dict",
    "load_state_dict_strict",
]

# Per-channel statistics of Wan2.1 latents (official release, `wan/modules/vae.py`).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan2.1 VAE. The default is the released one (``Wan2.1_VAE.pth``)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per encoder stage transition
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latents_mean", tuple(float(m) for m in self.latents_mean))
        object.__setattr__(self, "latents_std", tuple(float(s) for s in self.latents_std))
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1 or not self.dim_mult:
            raise ValueError(f"WanVAEConfig: base_dim, z_dim, num_res_blocks and dim_mult must be positive: {self}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig: temporal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} "
                f"entries, got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"WanVAEConfig: latents_mean and latents_std need z_dim = {self.z_dim} entries, "
                f"got {len(self.latents_mean)} and {len(self.latents_std)}"
            )
        if any(s <= 0 for s in self.latents_std):
            raise ValueError("WanVAEConfig: latents_std must be positive")
        # the decoder halves channels in each upsampler and feeds that to the next stage
        dec = [self.base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]
        if any(d % 2 for d in dec[1:-1]):
            raise ValueError(f"WanVAEConfig: decoder stage widths {dec[1:-1]} must be even")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def latent_frames(self, num_frames: int) -> int:
        return 1 + (num_frames - 1) // self.temporal_factor

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(z_dim, T_lat, H/8, W/8)`` for a video of that size (not validated)."""
        s = self.spatial_factor
        return (self.z_dim, self.latent_frames(num_frames), height // s, width // s)

    @classmethod
    def tiny(cls) -> WanVAEConfig:
        """The released structure (4 stages, 2 blocks, 8x spatial, 4x temporal, 16 latent channels) at
        base width 4 instead of 96 (~500x fewer parameters): for tests and CPU demos."""
        return cls(base_dim=4)

    @classmethod
    def from_diffusers(cls, config: Mapping) -> WanVAEConfig:
        """From an ``AutoencoderKLWan`` ``config.json`` dict; rejects variants this VAE is not (Wan2.2)."""
        unsupported = {
            "is_residual": lambda v: bool(v),
            "attn_scales": lambda v: bool(v),
            "patch_size": lambda v: v not in (None, 1),
            "in_channels": lambda v: v != 3,
            "out_channels": lambda v: v != 3,
            "decoder_base_dim": lambda v: v is not None and v != config.get("base_dim", 96),
        }
        bad = [f"{k}={config[k]!r}" for k, test in unsupported.items() if k in config and test(config[k])]
        if bad:
            raise ValueError(f"not a Wan2.1 VAE config (unsupported: {', '.join(bad)})")
        kw = {}
        for ours, theirs in [
            ("base_dim", "base_dim"),
            ("z_dim", "z_dim"),
            ("dim_mult", "dim_mult"),
            ("num_res_blocks", "num_res_blocks"),
            ("temporal_downsample", "temperal_downsample"),
            ("latents_mean", "latents_mean"),
            ("latents_std", "latents_std"),
        ]:
            if config.get(theirs) is not None:
                kw[ours] = config[theirs]
        return cls(**kw)

    def to_diffusers(self) -> dict:
        """Keyword arguments of ``diffusers.AutoencoderKLWan`` (and its ``config.json``)."""
        return {
            "base_dim": self.base_dim,
            "z_dim": self.z_dim,
            "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks,
            "attn_scales": [],
            "temperal_downsample": list(self.temporal_downsample),
            "dropout": 0.0,
            "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std),
        }


# ----------------------------------------------------------------------------------------------------
# Layers. Every temporal layer takes ``cache``: a dict, empty at the first frame of a video, that the
# layer reads and updates to carry what it needs from one chunk of frames to the next.

Cache = dict


class CausalConv3d(nn.Conv3d):
    """A Conv3d that is causal in time: with ``padding=(p_t, p_h, p_w)`` it pads ``2 p_t`` frames in
    front and none behind (space is padded symmetrically). With a cache, the front padding is the last
    ``2 p_t`` frames of the previous chunks (zeros only at the start of the video)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.history = 2 * pt
        self.space_padding = (pw, pw, ph, ph)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.history:
            past = cache.get(self) if cache is not None else None
            if past is not None:
                x = torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.history :].clone()  # clone: don't keep the chunk alive
            front = self.history - (past.shape[2] if past is not None else 0)
            x = F.pad(x, (*self.space_padding, front, 0))
        elif any(self.space_padding):
            x = F.pad(x, self.space_padding)
        return F.conv3d(x, self.weight, self.bias, self.stride)


def _conv_frames(conv: nn.Conv2d, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """A 2-D convolution applied to every frame of ``[B, C, T, H, W]`` (a 3-D conv with a 1-frame kernel)."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride), padding=(0, padding, padding))


class RMSNorm(nn.Module):
    """``x / ||x|| * sqrt(C) * weight`` with the norm over channels (dim 1), computed in fp32.
    ``weight`` keeps Wan's broadcast shape ``[C, 1, 1(, 1)]`` so checkpoints load unchanged."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.weight = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, *([1] * (x.ndim - 2)))
        return (F.normalize(x.float(), dim=1) * self.scale * w.float()).to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return h + (x if self.shortcut is None else self.shortcut(x))


class FrameAttention(nn.Module):
    """Single-head self-attention among the pixels of each frame (nothing crosses frames)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        q, k, v = F.linear(tokens, self.to_qkv.weight.view(3 * c, c), self.to_qkv.bias).chunk(3, dim=-1)
        o = F.linear(F.scaled_dot_product_attention(q, k, v), self.proj.weight.view(c, c), self.proj.bias)
        return x + o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block1 = ResBlock(dim, dim)
        self.attn = FrameAttention(dim)
        self.block2 = ResBlock(dim, dim)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        return self.block2(self.attn(self.block1(x, cache)), cache)


class Downsample(nn.Module):
    """Halves H and W (zero pad right/bottom, 3x3 conv, stride 2). If ``temporal``, also halves time:
    out[0] = x[0] and out[j] = time_conv(x[2j-2], x[2j-1], x[2j]); the cache holds the last frame."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = _conv_frames(self.conv, F.pad(x, (0, 1, 0, 1)), stride=2)
        if self.time_conv is None:
            return x
        last = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if last is not None:
            return self.time_conv(torch.cat([last, x], dim=2))
        if x.shape[2] == 1:  # start of the video: frame 0 passes through
            return x
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class Upsample(nn.Module):
    """Doubles H and W (nearest, then 3x3 conv to ``out_dim``). If ``temporal``, first doubles time:
    frame 0 passes through, every later frame becomes two (a causal conv to 2x channels over frames
    1, 2, ..., split into two consecutive frames)."""

    def __init__(self, dim: int, out_dim: int, temporal: bool):
        super().__init__()
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None
        self.conv = nn.Conv2d(dim, out_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return _conv_frames(self.conv, x, padding=1)

    def _double_frames(self, x: Tensor, cache: Cache) -> Tensor:
        first = None
        if self not in cache:  # start of the video
            cache[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2i+j = half j of frame i
        return x if first is None else torch.cat([first, x], dim=2)


class DownStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, downsample: Downsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.downsample = downsample

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        for block in self.blocks:
            x = block(x, cache)
        return x if self.downsample is None else self.downsample(x, cache)


class UpStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, upsample: Upsample | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.upsample = upsample

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        for block in self.blocks:
            x = block(x, cache)
        return x if self.upsample is None else self.upsample(x, cache)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        self.stages = nn.ModuleList(
            DownStage(
                dims[i],
                dims[i + 1],
                cfg.num_res_blocks,
                Downsample(dims[i + 1], cfg.temporal_downsample[i]) if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.mid = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.conv_in(x, cache)
        for stage in self.stages:
            x = stage(x, cache)
        x = self.mid(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        n = len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid = MidBlock(dims[0])
        self.stages = nn.ModuleList(
            UpStage(
                dims[i] if i == 0 else dims[i] // 2,  # the previous upsampler halved the channels
                dims[i + 1],
                cfg.num_res_blocks + 1,
                Upsample(dims[i + 1], dims[i + 1] // 2, temporal_up[i]) if i < n - 1 else None,
            )
            for i in range(n)
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        x = self.mid(self.conv_in(x, cache), cache)
        for stage in self.stages:
            x = stage(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


# ----------------------------------------------------------------------------------------------------
# The VAE


def _latent_chunks(num_latent: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        return [(0, num_latent)]
    return [(s, min(s + chunk_size, num_latent)) for s in range(0, num_latent, chunk_size)]


def _check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (latent frames per chunk) or None, got {chunk_size!r}")


class WanVAE(nn.Module):
    """The Wan2.1 VAE. ``encode``: video in [-1, 1] -> normalized latent mean; ``decode``: the inverse,
    clamped to [-1, 1]. Both return float32 and run without autograd (the VAE is frozen)."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else WanVAEConfig()
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> (mu, log_var)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    # -- latent normalization (float32) --

    def _stats(self, device) -> tuple[Tensor, Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def normalize(self, mu: Tensor) -> Tensor:
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def denormalize(self, latent: Tensor) -> Tensor:
        mean, std = self._stats(latent.device)
        return latent.float() * std + mean

    # -- encode / decode --

    def _param(self) -> Tensor:
        return self.quant_conv.weight

    # Some CUDA kernel silently computes garbage on very large activations: on an H100 (torch 2.11), a
    # one-pass bf16 decode of 81 frames at 480p (activations of ~6e9 elements) came out wrong, one of
    # 41 frames (~3e9) right. Chunks are kept under 2^31 elements, the usual int32-indexing bound: a
    # batch is split into slices of samples (samples are independent), and a chunk too large for one
    # sample is an error asking for a smaller chunk_size.
    MAX_ACTIVATION_ELEMENTS = 2**31 - 1

    def _largest_activation(self, chunk_frames: int, height: int, width: int) -> int:
        """An upper bound on the elements of any activation of one sample for a chunk of
        ``chunk_frames`` pixel frames: the full-resolution ones dominate (channels base*max(1, m0, m1))."""
        cfg = self.config
        channels = cfg.base_dim * max(1, *cfg.dim_mult[:2])
        return channels * (chunk_frames + 2) * (height + 2) * (width + 2)

    def _batch_slice(self, b: int, chunk_size: int | None, num_latent: int, height: int, width: int) -> int:
        tf = self.config.temporal_factor
        chunks = _latent_chunks(num_latent, chunk_size)
        frames = max(1 + tf * (e - 1) - (0 if s == 0 else 1 + tf * (s - 1)) for s, e in chunks)
        per_sample = self._largest_activation(frames, height, width)
        if per_sample > self.MAX_ACTIVATION_ELEMENTS:
            raise ValueError(
                f"chunk_size={chunk_size} gives chunks of {frames} frames at {height}x{width}, activations of "
                f"~{per_sample:.2e} elements per sample, over 2^31 (large activations have given wrong results "
                f"on CUDA); use a smaller chunk_size (1 is Wan's)"
            )
        return max(1, min(b, self.MAX_ACTIVATION_ELEMENTS // per_sample))

    @torch.no_grad()
    def encode(self, video: Tensor, *, chunk_size: int | None = 1) -> Tensor:
        """``video [B, 3, T, H, W]`` in [-1, 1], ``T = 1 + 4k``, ``H, W`` multiples of 8 ->
        normalized latent mean ``[B, 16, 1 + k, H/8, W/8]`` (float32).

        ``chunk_size``: latent frames per chunk (1: Wan's schedule, the first frame then 4 frames at a
        time; memory grows with it); ``None``: the whole clip in one pass (small clips only). All give
        the same result. Large batches are processed in slices of samples."""
        cfg = self.config
        _check_chunk_size(chunk_size)
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be a [B, 3, T, H, W] tensor, got {_describe(video)}")
        if not video.is_floating_point():
            raise ValueError(f"video must be floating point in [-1, 1], got dtype {video.dtype}")
        b, _, t, h, w = video.shape
        tf, sf = cfg.temporal_factor, cfg.spatial_factor
        if b < 1 or (t - 1) % tf or t < 1:
            raise ValueError(
                f"video must have 1 + {tf}k frames (1, 5, 9, ...), got T={t} in shape {tuple(video.shape)}"
            )
        if h < sf or w < sf or h % sf or w % sf:
            raise ValueError(f"video height and width must be positive multiples of {sf}, got H={h}, W={w}")
        n = cfg.latent_frames(t)
        step = self._batch_slice(b, chunk_size, n, h, w)
        p = self._param()
        latents = []
        for part in video.split(step):
            x = part.to(device=p.device, dtype=p.dtype)
            cache: Cache = {}
            outs = []
            for s, e in _latent_chunks(n, chunk_size):
                f0 = 0 if s == 0 else 1 + tf * (s - 1)
                outs.append(self.encoder(x[:, :, f0 : 1 + tf * (e - 1)], cache))
            latents.append(self.normalize(self.quant_conv(torch.cat(outs, dim=2))[:, : cfg.z_dim]))
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latent: Tensor, *, chunk_size: int | None = 1) -> Tensor:
        """Normalized ``latent [B, 16, T, h, w]`` -> ``video [B, 3, 1 + 4(T-1), 8h, 8w]`` in [-1, 1]
        (float32, clamped). ``chunk_size`` as in ``encode``."""
        cfg = self.config
        _check_chunk_size(chunk_size)
        if not isinstance(latent, Tensor) or latent.ndim != 5 or latent.shape[1] != cfg.z_dim:
            raise ValueError(f"latent must be a [B, {cfg.z_dim}, T, h, w] tensor, got {_describe(latent)}")
        if not latent.is_floating_point() or min(latent.shape) < 1:
            raise ValueError(f"latent must be a non-empty floating-point tensor, got {_describe(latent)}")
        b, _, n, h, w = latent.shape
        sf = cfg.spatial_factor
        step = self._batch_slice(b, chunk_size, n, h * sf, w * sf)
        p = self._param()
        videos = []
        for part in latent.split(step):
            x = self.post_quant_conv(self.denormalize(part.to(p.device)).to(p.dtype))
            cache: Cache = {}
            outs = [self.decoder(x[:, :, s:e], cache) for s, e in _latent_chunks(n, chunk_size)]
            videos.append(torch.cat(outs, dim=2).float().clamp_(-1.0, 1.0))
        return torch.cat(videos)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


# ----------------------------------------------------------------------------------------------------
# Key layouts. Shapes are the same in all three; only names differ.
#
#   ours                                   official (Wan2.1_VAE.pth)              diffusers (AutoencoderKLWan)
#   encoder.conv_in                        encoder.conv1                          encoder.conv_in
#   encoder.stages.{i}.blocks.{j}          encoder.downsamples.{i(n+1)+j}         encoder.down_blocks.{i(n+1)+j}
#   encoder.stages.{i}.downsample          encoder.downsamples.{i(n+1)+n}         encoder.down_blocks.{i(n+1)+n}
#   {en,de}coder.mid.block1/attn/block2    {en,de}coder.middle.0/1/2              {en,de}coder.mid_block.resnets.0/
#                                                                                   attentions.0/resnets.1
#   {en,de}coder.norm_out.weight           {en,de}coder.head.0.gamma              {en,de}coder.norm_out.gamma
#   {en,de}coder.conv_out                  {en,de}coder.head.2                    {en,de}coder.conv_out
#   quant_conv / post_quant_conv           conv1 / conv2                          quant_conv / post_quant_conv
#   decoder.conv_in                        decoder.conv1                          decoder.conv_in
#   decoder.stages.{i}.blocks.{j}          decoder.upsamples.{i(n+2)+j}           decoder.up_blocks.{i}.resnets.{j}
#   decoder.stages.{i}.upsample            decoder.upsamples.{i(n+2)+n+1}         decoder.up_blocks.{i}.upsamplers.0
# with n = num_res_blocks, and inside the modules:
#   res block  norm1.weight conv1 norm2.weight conv2 shortcut  |  residual.0.gamma residual.2 residual.3.gamma
#              residual.6 shortcut  |  norm1.gamma conv1 norm2.gamma conv2 conv_shortcut
#   attention  norm.weight to_qkv proj                          |  norm.gamma to_qkv proj (both)
#   resampler  conv time_conv                                   |  resample.1 time_conv (both)

_RES = {
    "official": {"norm1.weight": "residual.0.gamma", "conv1": "residual.2", "norm2.weight": "residual.3.gamma",
                 "conv2": "residual.6", "shortcut": "shortcut"},
    "diffusers": {"norm1.weight": "norm1.gamma", "conv1": "conv1", "norm2.weight": "norm2.gamma",
                  "conv2": "conv2", "shortcut": "conv_shortcut"},
}  # fmt: skip
_ATTN = {"norm.weight": "norm.gamma", "to_qkv": "to_qkv", "proj": "proj"}
_RESAMPLE = {"conv": "resample.1", "time_conv": "time_conv"}
_LAYOUTS = ("ours", "official", "diffusers")


def _leaf_map(table: dict[str, str], has_bias: Callable[[str], bool] = lambda k: not k.endswith(".weight")):
    """Expands ``{'conv1': 'residual.2', 'norm1.weight': ...}`` to full parameter names."""
    out = {}
    for ours, theirs in table.items():
        if has_bias(ours):
            out[ours + ".weight"] = theirs + ".weight"
            out[ours + ".bias"] = theirs + ".bias"
        else:
            out[ours] = theirs
    return out


def _key_table(layout: str, num_stages: int, num_res_blocks: int) -> dict[str, str]:
    """``{our key: key in layout}`` for every parameter a VAE with this structure can have (a superset:
    optional shortcuts and resamplers are included)."""
    n = num_res_blocks
    res, attn, resample = _leaf_map(_RES[layout]), _leaf_map(_ATTN), _leaf_map(_RESAMPLE)
    modules: list[tuple[str, str, dict]] = []  # (our prefix, their prefix, leaf map)

    def conv(ours, theirs):
        modules.append((ours, theirs, {"weight": "weight", "bias": "bias"}))

    off = layout == "official"
    conv("quant_conv", "conv1" if off else "quant_conv")
    conv("post_quant_conv", "conv2" if off else "post_quant_conv")
    for part in ("encoder", "decoder"):
        conv(f"{part}.conv_in", f"{part}.conv1" if off else f"{part}.conv_in")
        conv(f"{part}.conv_out", f"{part}.head.2" if off else f"{part}.conv_out")
        norm_out = f"{part}.head.0.gamma" if off else f"{part}.norm_out.gamma"
        modules.append((f"{part}.norm_out", "", {"weight": norm_out}))
        mid = [f"{part}.middle.{k}" for k in range(3)] if off else [
            f"{part}.mid_block.resnets.0", f"{part}.mid_block.attentions.0", f"{part}.mid_block.resnets.1"]
        modules += [(f"{part}.mid.block1", mid[0], res), (f"{part}.mid.attn", mid[1], attn),
                    (f"{part}.mid.block2", mid[2], res)]  # fmt: skip
    enc = "encoder.downsamples" if off else "encoder.down_blocks"
    for i in range(num_stages):
        for j in range(n):
            modules.append((f"encoder.stages.{i}.blocks.{j}", f"{enc}.{i * (n + 1) + j}", res))
        modules.append((f"encoder.stages.{i}.downsample", f"{enc}.{i * (n + 1) + n}", resample))
        for j in range(n + 1):
            theirs = f"decoder.upsamples.{i * (n + 2) + j}" if off else f"decoder.up_blocks.{i}.resnets.{j}"
            modules.append((f"decoder.stages.{i}.blocks.{j}", theirs, res))
        theirs = f"decoder.upsamples.{i * (n + 2) + n + 1}" if off else f"decoder.up_blocks.{i}.upsamplers.0"
        modules.append((f"decoder.stages.{i}.upsample", theirs, resample))
    table = {}
    for ours_prefix, their_prefix, leaves in modules:
        for leaf, their_leaf in leaves.items():
            table[f"{ours_prefix}.{leaf}"] = f"{their_prefix}.{their_leaf}" if their_prefix else their_leaf
    return table


def _infer_structure(keys, layout: str) -> tuple[int, int] | None:
    """``(num_stages upper bound, num_res_blocks)`` from key names, or None if they don't tell."""
    keys = list(keys)
    ints = [int(p) for k in keys for p in k.split(".") if p.isdigit()]
    num_stages = max(ints, default=0) + 1
    n = None
    if layout == "ours":
        js = [int(m.group(1)) for k in keys if (m := re.match(r"encoder\.stages\.\d+\.blocks\.(\d+)\.", k))]
        n = max(js) + 1 if js else None
    elif layout == "diffusers":
        js = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up_blocks\.\d+\.resnets\.(\d+)\.", k))]
        n = max(js) if js else None
    elif layout == "official":
        ks = [int(m.group(1)) for k in keys if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", k))]
        n = min(ks) if ks else None
        if n is None:
            ks = [int(m.group(1)) for k in keys if (m := re.match(r"decoder\.upsamples\.(\d+)\.resample\.", k))]
            n = min(ks) - 1 if ks else None
    return None if n is None or n < 1 else (num_stages, n)


def _structure(sd: Mapping, layout: str, config: WanVAEConfig | None) -> tuple[int, int]:
    if config is not None:
        return len(config.dim_mult), config.num_res_blocks
    found = _infer_structure(sd.keys(), layout)
    if found is None:
        d = WanVAEConfig()
        return len(d.dim_mult), d.num_res_blocks
    return found


def _rename(sd: Mapping[str, Tensor], table: Mapping[str, str]) -> dict[str, Tensor]:
    """Renames keys by ``table``; keys it doesn't know are kept as they are (a strict load reports them)."""
    out = {}
    for k, v in sd.items():
        new = table.get(k, k)
        if new in out:
            raise ValueError(f"two VAE keys map to {new!r} (one of them is {k!r})")
        out[new] = v
    return out


def vae_state_dict_to_official(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Our keys -> the official ``Wan2.1_VAE.pth`` keys (``config`` gives num_res_blocks; inferred if None)."""
    return _rename(sd, _key_table("official", *_structure(sd, "ours", config)))


def vae_state_dict_from_official(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Official ``Wan2.1_VAE.pth`` keys -> ours."""
    table = _key_table("official", *_structure(sd, "official", config))
    return _rename(sd, {v: k for k, v in table.items()})


def vae_state_dict_to_diffusers(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """Our keys -> ``diffusers.AutoencoderKLWan`` keys."""
    return _rename(sd, _key_table("diffusers", *_structure(sd, "ours", config)))


def vae_state_dict_from_diffusers(sd: Mapping[str, Tensor], config: WanVAEConfig | None = None) -> dict[str, Tensor]:
    """``diffusers.AutoencoderKLWan`` keys -> ours."""
    table = _key_table("diffusers", *_structure(sd, "diffusers", config))
    return _rename(sd, {v: k for k, v in table.items()})


_FROM = {"official": vae_state_dict_from_official, "diffusers": vae_state_dict_from_diffusers}
_TO = {"official": vae_state_dict_to_official, "diffusers": vae_state_dict_to_diffusers}


def detect_vae_layout(keys) -> str:
    """'ours', 'official' or 'diffusers', from the key names; ValueError if none fits."""
    keys = set(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("encoder.stages.") or has("decoder.stages.") or has("encoder.mid."):
        return "ours"
    if any(has(p) for p in ("encoder.downsamples.", "decoder.upsamples.", "encoder.middle.", "encoder.conv1.")):
        return "official"
    if has("encoder.down_blocks.") or has("decoder.up_blocks.") or has("encoder.mid_block."):
        return "diffusers"
    sample = ", ".join(sorted(keys)[:5]) or "no keys"
    raise ValueError(f"not a Wan VAE state dict (unrecognized keys: {sample})")


# ----------------------------------------------------------------------------------------------------
# Loading


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


def load_vae(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: WanVAEConfig | None = None,
) -> WanVAE:
    """Loads the Wan2.1 VAE from the official ``Wan2.1_VAE.pth`` (or any file in the official, diffusers
    or our key layout: ``.pth/.pt/.safetensors``) or from a diffusers folder (``vae/`` with config.json +
    safetensors, or the pipeline root holding it). The model is built on the meta device and the
    weights are assigned in ``dtype`` on ``device``; every key must match (one ``ValueError`` lists
    all problems). ``config`` defaults to the folder's config.json, else to the official 2.1 config."""
    path = Path(path)
    if path.is_dir():
        folder, files = _diffusers_folder(path)
        if config is None:
            config = WanVAEConfig.from_diffusers(json.loads((folder / "config.json").read_text()))
        sd = read_state_dict(files)
        layout, source = "diffusers", str(folder)
    else:
        sd = read_state_dict(path)
        config = config if config is not None else WanVAEConfig()
        layout, source = detect_vae_layout(sd.keys()), str(path)
    ours = sd if layout == "ours" else _FROM[layout](sd, config)
    if layout == "ours":
        report = lambda k: k  # noqa: E731
    else:
        table = _key_table(layout, len(config.dim_mult), config.num_res_blocks)
        report = lambda k: table.get(k, k)  # noqa: E731
    with torch.device("meta"):
        model = WanVAE(config)
    load_state_dict_strict(model, ours, what="Wan VAE", source=source, dtype=dtype, device=device,
                           rename_for_report=report)  # fmt: skip
    return model.eval().requires_grad_(False)


def save_vae(model: WanVAE, path: str | Path, layout: str = "ours") -> None:
    """Writes the weights as safetensors in ``layout`` ('ours', 'official' or 'diffusers'); for
    'diffusers' ``path`` is a folder and a config.json is written next to the weights."""
    from safetensors.torch import save_file

    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
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

