"""The one writer of images and videos (PNG, GIF, MP4), and the tiling of clips into frames.

Every command that writes pictures goes through here: `rcm sample` (digits grids and animations, Wan
videos), the digits distill report (samples.png/gif/mp4), the periodic samples of a Wan run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_uint8", "tile_clips", "write_image", "write_video"]


def to_uint8(video: Tensor) -> Tensor:
    """Values in [-1, 1] -> uint8 [0, 255] (rounded), same shape."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def tile_clips(clips: Tensor, scale: int = 4, pad: int = 1, max_cols: int = 10, fill: int = 128) -> Tensor:
    """Clips ``[N, 1, T, H, W]`` in [-1, 1] -> uint8 frames ``[T, H', W']``: the N clips side by side
    (rows of ``max_cols``), each pixel ``scale``², ``fill`` borders, padded to multiples of 16 (what
    video players want)."""
    n, _, t, h, w = clips.shape
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    out = torch.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad), fill, dtype=torch.uint8)
    pix = to_uint8(clips[:, 0].cpu())
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[:, y : y + h, x : x + w] = pix[i]
    out = out.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    th, tw = -out.shape[1] % 16, -out.shape[2] % 16
    return torch.nn.functional.pad(out, (0, tw, 0, th), value=fill)


def write_image(path: str | Path, image) -> Path:
    """A uint8 image ``[H, W]`` or ``[H, W, 3]`` (numpy or tensor) as a PNG (or any format imageio knows)."""
    import imageio.v3 as iio

    image = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"an image must be uint8 [H, W(, 3)], got {image.dtype} {image.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    return path


def write_video(path: str | Path, frames, fps: int = 16) -> Path:
    """Writes uint8 frames ``[T, H, W]`` or ``[T, H, W, 3]`` (numpy or tensor) as ``.mp4`` (H.264,
    yuv420p, through imageio-ffmpeg) or ``.gif`` (looping)."""
    import imageio.v3 as iio

    frames = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4):
        raise ValueError(f"frames must be uint8 [T, H, W(, 3)], got {frames.dtype} {frames.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        iio.imwrite(path, frames, extension=".gif", duration=round(1000 / fps), loop=0)
    elif suffix == ".mp4":
        if frames.ndim == 3:
            frames = np.repeat(frames[..., None], 3, axis=-1)
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            raise ValueError(f"an H.264 video needs even height and width, got {frames.shape[1:3]}")
        import imageio.v2 as iio2

        iio2.mimwrite(path, list(frames), format="FFMPEG", fps=fps, codec="libx264", quality=8,
                      pixelformat="yuv420p", macro_block_size=1, output_params=["-movflags", "+faststart"])  # fmt: skip
    else:
        raise ValueError(f"unsupported video format {path.suffix!r} (use .mp4 or .gif)")
    return path
