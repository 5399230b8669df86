"""How a Wan image-to-video DiT is given its first frame: the ``FrameCondition`` of an image
(docs/method.md §12.1, docs/i2v.md).

Two ways, read from the DiT's config:

* **Channels** (Wan2.1 I2V-14B, Wan2.2 I2V-A14B: ``cond_dim > 0``): ``y`` = 4 mask channels ++ the VAE
  latent of the video "image, then black frames". The mask marks the pixel frames that are known, grouped
  by the VAE's temporal factor with the first pixel frame counted ``temporal_factor`` times (the causal
  VAE's first latent frame stands for frame 0 alone), so latent frame 0 has all four channels at 1 and
  the others 0. Wan2.1 I2V adds the CLIP image tokens (``image_dim`` set) as ``image_context``. The state
  itself is all generated, as the official samplers do.
* **Frame replacement** (Wan2.2 TI2V-5B: ``cond_dim == 0``): the image alone encodes to one latent frame,
  which replaces latent frame 0 of every state; that frame sits at time 0 (``mask`` True there).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rcm.models.trigflow import FrameCondition
from rcm.models.wan import WanConfig

__all__ = ["first_frame_mask_channels", "first_latent_frame_condition", "image_conditioning", "wan_image_condition"]


def image_conditioning(config: WanConfig) -> Literal["channels", "frame"]:
    """How a DiT of this config takes an image: "channels" (``y``, maybe CLIP tokens) or "frame"."""
    return "channels" if config.cond_dim else "frame"


def first_frame_mask_channels(num_frames: int, latent_frames: int, temporal_factor: int = 4) -> Tensor:
    """``[1, temporal_factor, latent_frames, 1, 1]`` float32: 1 where a pixel frame is known (frame 0 only).

    Pixel frame 0 is repeated ``temporal_factor`` times in front of the others and the sequence is folded
    into ``temporal_factor`` channels per latent frame (Wan's I2V mask)."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor or 1 + (num_frames - 1) // temporal_factor != latent_frames:
        raise ValueError(f"num_frames={num_frames} does not make {latent_frames} latent frames with temporal "
                         f"factor {temporal_factor} (num_frames must be 1 + {temporal_factor}k)")
    known = torch.zeros(num_frames)
    known[0] = 1.0
    padded = torch.cat([known[:1].repeat(temporal_factor - 1), known])  # [temporal_factor · latent_frames]
    return padded.view(latent_frames, temporal_factor).t().reshape(1, temporal_factor, latent_frames, 1, 1)


def wan_image_condition(config: WanConfig, vae, image: Tensor, num_frames: int, *, image_encoder=None,
                        chunk_size: int | None = 1) -> FrameCondition:
    """The conditioning of a ``num_frames`` video whose first frame is ``image`` [B, 3, H, W] in [-1, 1]
    (H, W: the video's size), for a DiT of ``config`` (float32 tensors on ``image``'s device).

    vae: a ``WanVAE`` with ``config.out_dim`` latent channels; image_encoder: a ``CLIPImageEncoder``,
    required exactly when the DiT has image cross-attention (``config.image_dim``)."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a floating tensor [B, 3, H, W] in [-1, 1], got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
    if vae.config.z_dim != config.out_dim:
        raise ValueError(f"vae has {vae.config.z_dim} latent channels, the DiT generates {config.out_dim}")
    if (config.image_dim is not None) != (image_encoder is not None):
        raise ValueError("image_encoder: the DiT has CLIP image cross-attention (image_dim set), an image encoder is "
                         "required" if config.image_dim is not None else
                         "image_encoder given but the DiT has no image cross-attention (image_dim=None)")
    b, _, height, width = image.shape
    frames = image[:, :, None].float()
    if image_conditioning(config) == "frame":
        first = vae.encode(frames, chunk_size=chunk_size)  # [B, z, 1, h, w]
        latent = first.new_zeros(b, first.shape[1], vae.config.latent_frames(num_frames), *first.shape[3:])
        latent[:, :, :1] = first
        return first_latent_frame_condition(latent)
    video = torch.cat([frames, frames.new_zeros(b, 3, num_frames - 1, height, width)], dim=2)
    latent = vae.encode(video, chunk_size=chunk_size)  # [B, z, T_lat, h, w]
    mask = first_frame_mask_channels(num_frames, latent.shape[2], vae.config.temporal_factor).to(latent.device)
    y = torch.cat([mask.expand(b, -1, -1, *latent.shape[3:]), latent], dim=1)
    if y.shape[1] != config.cond_dim:
        raise ValueError(f"the image makes {y.shape[1]} conditioning channels (mask {mask.shape[1]} + latent "
                         f"{latent.shape[1]}), the DiT takes cond_dim={config.cond_dim}")
    inputs = {"y": y}
    if image_encoder is not None:
        tokens = image_encoder.encode(image)
        if tuple(tokens.shape[1:]) != (config.image_len, config.image_dim):
            raise ValueError(f"image_encoder makes tokens {tuple(tokens.shape[1:])}, the DiT takes "
                             f"({config.image_len}, {config.image_dim})")
        inputs["image_context"] = tokens.float()
    return FrameCondition(inputs=inputs)


def first_latent_frame_condition(latent: Tensor) -> FrameCondition:
    """Frame replacement from a video latent ``[B, C, T, H, W]`` itself: its first latent frame given.

    The causal VAEs encode pixel frame 0 alone into latent frame 0, so a video's first latent frame *is*
    its first image's latent (tested): a TI2V training batch of video latents is its own condition."""
    if not isinstance(latent, Tensor) or latent.ndim != 5:
        raise ValueError(f"latent must be a tensor [B, C, T, H, W], got "
                         f"{tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__}")
    mask = torch.zeros(1, 1, latent.shape[2], 1, 1, dtype=torch.bool, device=latent.device)
    mask[:, :, 0] = True
    return FrameCondition(latent, mask)
