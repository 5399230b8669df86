"""The Wan2.1 pipeline's pieces: sampling a latent (student or teacher), decoding it, video sizes, devices.

Students use the few-step consistency sampler (docs/method.md §5.2, ``rcm.samplers.sample_consistency``:
TrigFlow times [arctan σ_max, 1.5, 1.4, 1.0][:N] then 0, re-noising with fresh noise between steps;
the rCM release's standalone RF-form script is the same algorithm, except that it starts from ρ_0·z
rather than z: x_ρ differs by the factor sin t_0 = 1/√(1 + 1/σ_max²), 1 − 8e-5 at σ_max = 80).
Teachers use flow UniPC or Euler over Wan's shifted schedule with classifier-free guidance (§5.3).
`rcm sample wan...` (``rcm.wan.sample``) puts them together with the text encoder and the VAE.
"""

from __future__ import annotations


import torch
from torch import Tensor

from rcm import ConfigError, PathArgumentError
from rcm.media import to_uint8
from rcm.sample import resolve_device  # re-exported: the Wan commands import it from here
from rcm.wan import presets

__all__ = ["PathArgumentError", "decode_videos", "resolve_device", "sample_wan_latent", "video_size"]


def video_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a Wan2.1 size, e.g. ``('480p', '16:9') -> (480, 832)``."""
    sizes = presets.WAN_SIZES
    if resolution not in sizes:
        raise ConfigError("resolution", f"must be one of {', '.join(sizes)}, got {resolution!r}")
    if aspect_ratio not in sizes[resolution]:
        raise ConfigError("aspect_ratio", f"must be one of {', '.join(sizes[resolution])}, got {aspect_ratio!r}")
    return sizes[resolution][aspect_ratio]


@torch.no_grad()
def sample_wan_latent(dit, context: Tensor, noise: Tensor, *, kind: str, generator: torch.Generator,
                      num_steps: int = 4, sigma_max: float | None = None, sampler: str = "unipc", steps: int = presets.TEACHER_STEPS,
                      guidance: float = presets.GUIDANCE, shift: float = presets.SHIFT, negative_context: Tensor | None = None,
                      progress=None) -> Tensor:
    """One batch of Wan latents (float32, normalized VAE space) from ``noise [B, 16, T, h, w]``.

    Student: ``num_steps`` consistency steps from σ_max (default 80), re-noised from ``generator``.
    Teacher: ``steps`` of UniPC/Euler over the shift-``shift`` schedule from σ_max (default 5000),
    CFG ``guidance`` against ``negative_context``. ``progress(i, n)`` after each step."""
    from rcm.samplers import (
        consistency_times, sample_consistency, sample_euler, sample_unipc, shifted_flow_times, student_denoiser,
        teacher_velocity,
    )  # fmt: skip

    if kind == "student":
        times = consistency_times(num_steps, sigma_max=presets.STUDENT_SIGMA_MAX if sigma_max is None else sigma_max)
        out = sample_consistency(student_denoiser(dit, context), noise, times, generator=generator, progress=progress)
    elif kind == "teacher":
        velocity = teacher_velocity(dit, context, guidance=guidance, negative_context=negative_context)
        times = shifted_flow_times(steps, shift=shift, sigma_max=presets.TEACHER_SIGMA_MAX if sigma_max is None else sigma_max)
        run = {"unipc": sample_unipc, "euler": sample_euler}[sampler]
        out = run(velocity, noise, times, progress=progress)
    else:
        raise ValueError(f"kind must be 'student' or 'teacher', got {kind!r}")
    return out.float()


@torch.no_grad()
def decode_videos(vae, latent: Tensor, *, chunk_size: int = 1) -> Tensor:
    """Latents ``[B, 16, T, h, w]`` -> uint8 videos ``[B, 1 + 4(T-1), 8h, 8w, 3]`` on the CPU."""
    video = vae.decode(latent.to(vae.quant_conv.weight.device), chunk_size=chunk_size)  # [B, 3, T, H, W]
    return to_uint8(video).permute(0, 2, 3, 4, 1).cpu()


