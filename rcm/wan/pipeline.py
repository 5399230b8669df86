"""The Wan pipeline's pieces: sampling a latent (student or teacher, optionally image-conditioned), decoding
it, video sizes, reading and fitting images and frames, devices.

Students use the few-step consistency sampler (docs/method.md §5.2, ``rcm.samplers.sample_consistency``:
TrigFlow times [arctan σ_max, 1.5, 1.4, 1.0][:N] then 0, re-noising with fresh noise between steps;
the rCM release's standalone RF-form script is the same algorithm, except that it starts from ρ_0·z
rather than z: x_ρ differs by the factor sin t_0 = 1/√(1 + 1/σ_max²), 1 − 8e-5 at σ_max = 80).
Teachers use flow UniPC or Euler over Wan's shifted schedule with classifier-free guidance (§5.3).
Image-to-video passes the image's ``FrameCondition`` (§12) to either; a two-expert DiT (``WanExperts``)
is one network of t, so every step goes to the expert of its time.
`rcm sample wan...` (``rcm.wan.sample``) puts them together with the text encoder and the VAE.
"""

from __future__ import annotations


import torch
from torch import Tensor

from rcm import ConfigError, PathArgumentError
from rcm.media import to_uint8
from rcm.sample import resolve_device  # re-exported: the Wan commands import it from here
from rcm.wan import presets

__all__ = ["PathArgumentError", "decode_videos", "fit_frames", "image_mode", "read_image", "resolve_device", "sample_wan_latent",
           "video_size"]


def video_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a Wan2.1 size, e.g. ``('480p', '16:9') -> (480, 832)``."""
    sizes = presets.WAN_SIZES
    if resolution not in sizes:
        raise ConfigError("resolution", f"must be one of {', '.join(sizes)}, got {resolution!r}")
    if aspect_ratio not in sizes[resolution]:
        raise ConfigError("aspect_ratio", f"must be one of {', '.join(sizes[resolution])}, got {aspect_ratio!r}")
    return sizes[resolution][aspect_ratio]


def image_mode(config, vae_config) -> str | None:
    """How a DiT takes an image: "channels" (``y``: Wan2.1 I2V-14B, Wan2.2 I2V-A14B, in_dim > out_dim),
    "frame" (frame replacement: Wan2.2 TI2V-5B, told apart from a T2V DiT by its Wan2.2 VAE, the
    residual one it was trained with) or None (text-to-video only)."""
    if config.cond_dim:
        return "channels"
    return "frame" if vae_config.residual else None


def fit_frames(frames: Tensor, height: int, width: int) -> Tensor:
    """Frames ``[T, 3, h, w]`` (any float range) scaled to *cover* ``height x width`` (aspect ratio kept,
    the short side fitting) and centre-cropped to it, antialiased bilinear: ``[T, 3, height, width]``.
    One rule for every input image or video (``rcm synth --videos``, ``rcm sample --image``)."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)  # crop the excess after scaling the short side to fit
    ch, cw = min(h, round(height / scale)), min(w, round(width / scale))
    top, left = (h - ch) // 2, (w - cw) // 2
    frames = frames[:, :, top : top + ch, left : left + cw]
    return torch.nn.functional.interpolate(frames, size=(height, width), mode="bilinear", antialias=True,
                                           align_corners=False)


def read_image(path, height: int, width: int, *, field: str = "image") -> Tensor:
    """An image file (PNG, JPEG, WebP, ...; grey, RGBA and palette images as RGB) fitted to
    ``height x width`` by ``fit_frames``: ``[1, 3, height, width]`` float32 in [-1, 1]. A missing file
    is a ``PathArgumentError``, an unreadable one a ``ConfigError``, both naming ``field``."""
    from pathlib import Path

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise PathArgumentError(field, f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(field, f"cannot read {path} as an image ({type(e).__name__}: {e})") from e
    frames = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # [1, 3, h, w], 0..255
    return (fit_frames(frames, height, width) / 127.5 - 1).clamp(-1, 1)


@torch.no_grad()
def sample_wan_latent(dit, context: Tensor, noise: Tensor, *, kind: str, generator: torch.Generator,
                      steps: int | None = None, sigma_max: float | None = None, mid_times=None, sampler: str = "unipc",
                      guidance: float = presets.GUIDANCE, shift: float = presets.SHIFT, negative_context: Tensor | None = None,
                      condition=None, progress=None) -> Tensor:
    """One batch of Wan latents (float32, normalized VAE space) from ``noise [B, C, T, h, w]``.

    Student: ``steps`` (default 4) consistency steps from σ_max (default 80) through ``mid_times`` (default
    the reference's 1.5, 1.4, 1.0), re-noised from ``generator``.
    Teacher: ``steps`` (default 50) of UniPC/Euler over the shift-``shift`` schedule from σ_max (default 5000),
    CFG ``guidance`` against ``negative_context`` (the image conditioning stays in both passes).
    ``condition``: the image's ``FrameCondition`` (``rcm.models.wan_image``), imposed on every state and
    network call; ``dit`` may be a ``WanExperts`` (each step to its expert). ``progress(i, n)`` after
    each step."""
    from rcm.samplers import (
        consistency_times, sample_consistency, sample_euler, sample_unipc, shifted_flow_times, student_denoiser,
        teacher_velocity,
    )  # fmt: skip

    if kind == "student":
        times = consistency_times(4 if steps is None else steps, mid_times=mid_times,
                                  sigma_max=presets.STUDENT_SIGMA_MAX if sigma_max is None else sigma_max)
        out = sample_consistency(student_denoiser(dit, context, condition=condition), noise, times, generator=generator,
                                 progress=progress)
    elif kind == "teacher":
        velocity = teacher_velocity(dit, context, guidance=guidance, negative_context=negative_context,
                                    condition=condition)
        times = shifted_flow_times(presets.TEACHER_STEPS if steps is None else steps, shift=shift, sigma_max=presets.TEACHER_SIGMA_MAX if sigma_max is None else sigma_max)
        run = {"unipc": sample_unipc, "euler": sample_euler}[sampler]
        out = run(velocity, noise, times, progress=progress)
    else:
        raise ValueError(f"kind must be 'student' or 'teacher', got {kind!r}")
    return out.float()


@torch.no_grad()
def decode_videos(vae, latent: Tensor, *, chunk_size: int = 1) -> Tensor:
    """Latents ``[B, z, T, h, w]`` -> uint8 videos ``[B, 1 + 4(T-1), s·h, s·w, 3]`` on the CPU (s: the VAE's
    spatial factor, 8 for Wan2.1's, 16 for Wan2.2's)."""
    video = vae.decode(latent.to(vae.quant_conv.weight.device), chunk_size=chunk_size)  # [B, 3, T, H, W]
    return to_uint8(video).permute(0, 2, 3, 4, 1).cpu()


