"""Building blocks of the Wan video VAEs (2.1 and 2.2), causal in time.

Every temporal layer takes ``cache``: a dict, empty at the first frame of a video, that the layer reads
and updates (keyed by the layer itself) to carry what it needs from one chunk of frames to the next.
Processing a video chunk by chunk with one cache equals processing it in one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Cache",
    "CausalConv3d",
    "Downsample",
    "FoldDownShortcut",
    "FrameAttention",
    "MidBlock",
    "RMSNorm",
    "RepeatUpShortcut",
    "ResBlock",
    "Upsample",
    "memory_format",
    "patchify",
    "unpatchify",
]

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
        # One copy of the activation at most (the concatenation in time); space is padded inside the
        # convolution, which costs no copy.
        if self.history:
            past = cache.get(self) if cache is not None else None
            # at the start of the video the missing frames are zeros (F.pad keeps the memory format)
            x = F.pad(x, (0, 0, 0, 0, self.history, 0)) if past is None else torch.cat([past, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.history :].clone()  # clone: don't keep the chunk alive
        pw, _, ph, _ = self.space_padding
        return F.conv3d(x, self.weight, self.bias, self.stride, padding=(0, ph, pw))


def conv_frames(conv: nn.Conv2d, x: Tensor, stride: int = 1, padding: int = 0) -> Tensor:
    """A 2-D convolution applied to every frame of ``[B, C, T, H, W]`` (a 3-D conv with a 1-frame kernel)."""
    return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, stride, stride), padding=(0, padding, padding))


def memory_format(x: Tensor) -> torch.memory_format:
    """``channels_last_3d`` for a channels-last 5-D tensor (the decoder's fast layout on CUDA), else the
    contiguous format."""
    cl = x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous()
    return torch.channels_last_3d if cl else torch.contiguous_format


class RMSNorm(nn.Module):
    """``x / ||x|| * sqrt(C) * weight`` with the norm over channels (dim 1) reduced in fp32 and applied
    in the input's dtype (no fp32 copy of the activation). ``weight`` keeps Wan's broadcast shape
    ``[C, 1, 1(, 1)]`` so checkpoints load unchanged."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.weight = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, *([1] * (x.ndim - 2))).to(x.dtype)
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12)
        return x * (self.scale / norm).to(x.dtype) * w


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
        x = conv_frames(self.conv, F.pad(x, (0, 1, 0, 1)), stride=2)
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
        return conv_frames(self.conv, x, padding=1)

    def _double_frames(self, x: Tensor, cache: Cache) -> Tensor:
        first = None
        if self not in cache:  # start of the video
            cache[self] = True
            first, x = x[:, :, :1], x[:, :, 1:]
        if x.shape[2]:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)
            # frame 2i + j = channel half j of frame i; written into a tensor of y's memory format
            x = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=memory_format(y))
            x[:, :, 0::2], x[:, :, 1::2] = y[:, :c], y[:, c:]
        return x if first is None else torch.cat([first, x], dim=2)



# ----------------------------------------------------------------------------------------------------
# Wan2.2: parameter-free shortcuts around a residual stage, and the pixel patches


class FoldDownShortcut(nn.Module):
    """Shortcut around a Wan2.2 encoder stage: folds each ``factor_t x factor_s x factor_s`` block of
    (frames, pixels) into channels (channel-major: ``c, dt, dy, dx``) and averages consecutive groups of
    those channels down to ``out_dim``. In time it is causal like ``Downsample``: at the start of the
    video ``factor_t - 1`` zero frames go in front (frame 0 alone makes the first output frame)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        folded = in_dim * factor_t * factor_s**2
        if folded % out_dim:
            raise ValueError(f"FoldDownShortcut: {folded} folded channels do not divide into out_dim={out_dim}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        if ft > 1 and self not in cache:  # start of the video
            cache[self] = True
            x = F.pad(x, (0, 0, 0, 0, ft - 1, 0))
        b, c, t, h, w = x.shape
        if t % ft:
            raise ValueError(f"FoldDownShortcut: a chunk after the first needs a multiple of {ft} frames, got {t}")
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, -1, t // ft, h // fs, w // fs).mean(dim=2)


class RepeatUpShortcut(nn.Module):
    """Shortcut around a Wan2.2 decoder stage, the transpose of ``FoldDownShortcut``'s layout: repeats
    each channel to ``out_dim * factor_t * factor_s**2`` channels and unfolds them into frames and
    pixels. Causal like ``Upsample``: at the start of the video the first ``factor_t - 1`` produced
    frames are dropped (latent frame 0 makes one frame)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        unfolded = out_dim * factor_t * factor_s**2
        if unfolded % in_dim:
            raise ValueError(f"RepeatUpShortcut: {unfolded} unfolded channels are not a multiple of in_dim={in_dim}")
        self.out_dim, self.factor_t, self.factor_s = out_dim, factor_t, factor_s
        self.repeats = unfolded // in_dim

    def forward(self, x: Tensor, cache: Cache) -> Tensor:
        ft, fs = self.factor_t, self.factor_s
        b, c, t, h, w = x.shape
        # channel c * repeats + r holds input channel c: a broadcast view, copied once by the reshape below
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w).reshape(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        if ft > 1 and self not in cache:  # start of the video
            cache[self] = True
            x = x[:, :, ft - 1 :]
        return x


def patchify(video: Tensor, patch: int) -> Tensor:
    """``[B, C, T, H, W]`` -> ``[B, C p p, T, H/p, W/p]``; channel ``c p^2 + dx p + dy`` holds pixel
    ``(p y + dy, p x + dx)`` (Wan2.2's order: the column offset before the row offset)."""
    if patch == 1:
        return video
    b, c, t, h, w = video.shape
    x = video.view(b, c, t, h // patch, patch, w // patch, patch).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * patch * patch, t, h // patch, w // patch)


def unpatchify(x: Tensor, patch: int) -> Tensor:
    """The inverse of ``patchify``."""
    if patch == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (patch * patch)
    x = x.view(b, c, patch, patch, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c, t, h * patch, w * patch)
