"""The Wan video VAEs: Wan2.1 (16 channels, 8x spatial) and Wan2.2 (48 channels, 16x spatial), both 4x
causal temporal, as one network configured by ``WanVAEConfig``.

A video ``[B, 3, T, H, W]`` in [-1, 1] with ``T = 1 + 4k`` frames and ``H, W`` multiples of the
spatial factor ``s`` maps to a latent ``[B, z_dim, 1 + k, H/s, W/s]``. Frame 0 is coded on its own (it
is an image); every later group of 4 frames becomes one latent frame.

Everything is causal in time (see ``blocks``), so a video is processed in chunks of frames carrying a
small cache, and the result equals one pass over the whole clip. Wan processes the first frame, then 4
frames at a time; ``chunk_size`` picks how many latent frames go in one chunk (memory is bounded by the
chunk, not the video), ``None`` does the whole clip in one pass.

Wan2.2 (``config.residual``, ``config.patch_size=2``): 2x2 pixels are folded into 12 channels before
the encoder and unfolded after the decoder; each encoder stage adds ``FoldDownShortcut`` of its input to
its output, each decoder stage ``RepeatUpShortcut``; decoder upsamplers keep the channel count (2.1's
halve it).

Latents are normalized per channel with Wan's constants: ``encode`` returns ``(mu - mean) / std`` and
``decode`` undoes it. The posterior's log-variance is not used (Wan encodes with the mean).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (
    Cache,
    CausalConv3d,
    Downsample,
    FoldDownShortcut,
    MidBlock,
    RepeatUpShortcut,
    ResBlock,
    RMSNorm,
    Upsample,
    patchify,
    unpatchify,
)
from .config import WanVAEConfig

__all__ = ["WanVAE"]


class DownStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, downsample: Downsample | None,
                 shortcut: FoldDownShortcut | None = None):  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.downsample = downsample
        self.shortcut = shortcut

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        h = x
        for block in self.blocks:
            h = block(h, cache)
        if self.downsample is not None:
            h = self.downsample(h, cache)
        return h if self.shortcut is None else h + self.shortcut(x, cache)


class UpStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, upsample: Upsample | None,
                 shortcut: RepeatUpShortcut | None = None):  # fmt: skip
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(num_blocks))
        self.upsample = upsample
        self.shortcut = shortcut

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        h = x
        for block in self.blocks:
            h = block(h, cache)
        if self.upsample is not None:
            h = self.upsample(h, cache)
        return h if self.shortcut is None else h + self.shortcut(x, cache)


class Encoder(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims, n = cfg.encoder_dims, len(cfg.dim_mult)
        self.conv_in = CausalConv3d(cfg.image_channels, dims[0], 3, padding=1)
        stages = []
        for i in range(n):
            down = i < n - 1
            temporal = down and cfg.temporal_downsample[i]
            shortcut = None
            if cfg.residual:  # the last stage keeps its shortcut (a channel-group mean, no resampling)
                shortcut = FoldDownShortcut(dims[i], dims[i + 1], 2 if temporal else 1, 2 if down else 1)
            stages.append(DownStage(dims[i], dims[i + 1], cfg.num_res_blocks,
                                    Downsample(dims[i + 1], temporal) if down else None, shortcut))  # fmt: skip
        self.stages = nn.ModuleList(stages)
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
        dims, n = cfg.decoder_dims, len(cfg.dim_mult)
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid = MidBlock(dims[0])
        stages = []
        for i in range(n):
            up = i < n - 1
            temporal = up and temporal_up[i]
            # 2.1: each upsampler halves the channels it passes on; 2.2 keeps them
            in_dim = dims[i] if i == 0 or cfg.residual else dims[i] // 2
            up_dim = dims[i + 1] if cfg.residual else dims[i + 1] // 2
            shortcut = RepeatUpShortcut(in_dim, dims[i + 1], 2 if temporal else 1, 2) if cfg.residual and up else None
            stages.append(UpStage(in_dim, dims[i + 1], cfg.num_res_blocks + 1,
                                  Upsample(dims[i + 1], up_dim, temporal) if up else None, shortcut))  # fmt: skip
        self.stages = nn.ModuleList(stages)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.image_channels, 3, padding=1)

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
    """A Wan VAE (2.1 by default, ``WanVAE(WanVAEConfig.wan22())`` for 2.2). ``encode``: video in
    [-1, 1] -> normalized latent mean; ``decode``: the inverse, clamped to [-1, 1]. Both return float32
    and run without autograd (the VAE is frozen)."""

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
        ``chunk_frames`` pixel frames of ``height x width`` pixels: the ones at the full (patched)
        resolution dominate (channels ``max(base, decoder base) * max(1, m0, m1)``)."""
        cfg = self.config
        channels = max(cfg.base_dim, cfg.decoder_base_dim or 0) * max(1, *cfg.dim_mult[:2])
        p = cfg.patch_size
        return channels * (chunk_frames + 2) * (height // p + 2) * (width // p + 2)

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
        """``video [B, 3, T, H, W]`` in [-1, 1], ``T = 1 + 4k``, ``H, W`` multiples of ``s`` (the spatial
        factor: 8 for Wan2.1, 16 for Wan2.2) -> normalized latent mean ``[B, z_dim, 1 + k, H/s, W/s]``
        (float32).

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
            x = patchify(part.to(device=p.device, dtype=p.dtype), cfg.patch_size)
            cache: Cache = {}
            outs = []
            for s, e in _latent_chunks(n, chunk_size):
                f0 = 0 if s == 0 else 1 + tf * (s - 1)
                outs.append(self.encoder(x[:, :, f0 : 1 + tf * (e - 1)], cache))
            latents.append(self.normalize(self.quant_conv(torch.cat(outs, dim=2))[:, : cfg.z_dim]))
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latent: Tensor, *, chunk_size: int | None = 1, channels_last: bool = False) -> Tensor:
        """Normalized ``latent [B, z_dim, T, h, w]`` -> ``video [B, 3, 1 + 4(T-1), s h, s w]`` in [-1, 1]
        (float32, clamped). ``chunk_size`` as in ``encode``. ``channels_last``: run the decoder on
        ``channels_last_3d`` activations (cuDNN's native layout for bf16 3-D convolutions; the same
        result up to rounding)."""
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
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
            outs = [self.decoder(x[:, :, s:e].contiguous(memory_format=fmt), cache)
                    for s, e in _latent_chunks(n, chunk_size)]  # fmt: skip
            videos.append(unpatchify(torch.cat(outs, dim=2), cfg.patch_size).float().clamp_(-1.0, 1.0))
        return torch.cat(videos)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


