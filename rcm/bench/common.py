"""What `rcm bench step` and `rcm bench sample` share: Wan shapes at real video sizes, analytic model
FLOPs, random-weight DiTs, and device helpers. FLOP counts (matmuls only; elementwise work is not counted):

    forward F      = linear 2·N·P_lin + self-attention 4·B·H·L²·D + cross-attention 4·B·H·L·L_text·D (per layer)
    JVP pass       = 2× linear + 3× self-attention (12·BHL²D) + 2× cross-attention (the text has no tangent)
    backward       = 2 F (activation-checkpointing recomputation is not counted, as MFU conventions go)
    student step   = teacher CFG 2F + JVP + F + 2F (sCM) + n F + 2F (rollout with grad on the last step)
                     + 3F (fake score, teacher CFG)                                    n: rollout steps
    critic step    = n F (rollout) + F + 2F (fake score forward and backward)
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from rcm import ConfigError, check_count, check_memory

from rcm.models.wan import WAN_CONFIGS, WanConfig, WanDiT

WAN_FRAME_RATE_DIVISOR = 4  # the VAE's causal temporal factor: frames = 1 + 4 (T − 1)


@dataclass(frozen=True)
class WanShape:
    """A Wan video size and its latent / token counts (``spatial_factor``: the VAE's, 8 for Wan2.1's, 16
    for Wan2.2's; the latent has the DiT's ``out_dim`` channels, the generated ones)."""

    config: WanConfig
    num_frames: int
    height: int
    width: int
    batch_size: int = 1
    spatial_factor: int = 8

    @property
    def latent(self) -> tuple[int, int, int, int, int]:
        s = self.spatial_factor
        return (self.batch_size, self.config.out_dim, 1 + (self.num_frames - 1) // 4, self.height // s, self.width // s)

    @property
    def tokens(self) -> int:
        return math.prod(self.latent[2:]) // self.config.patch_numel


def wan_shape(model: str, resolution: str, num_frames: int, height: int | None = None, width: int | None = None,
              batch_size: int = 1) -> WanShape:
    """Checked size of a benchmark: explicit height/width or a resolution (16:9)."""
    from rcm.wan.pipeline import video_size

    config = WAN_CONFIGS[model]
    if (height is None) != (width is None):
        raise ConfigError("height" if height is None else "width", "give both --height and --width, or neither")
    if height is None:
        height, width = video_size(resolution, "16:9")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ConfigError("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {num_frames}")
    step = 8 * config.patch_size[1]
    for name, size in (("height", height), ("width", width)):
        if size < step or size % step:
            raise ConfigError(name, f"must be a positive multiple of {step}, got {size}")
    check_count("batch_size", batch_size, 1, 2**31 - 1)
    check_count("num_frames", num_frames, 1, 2**20)
    return WanShape(config, num_frames, height, width, batch_size)


def check_shape_fits(shape: WanShape, device) -> None:
    """The benchmark's first big tensor, the fp32 latent batch, must fit on ``device`` (checked at the start,
    naming the flag to lower: a batch of 10^12 or a 10^6-pixel height fails here, not in an allocation)."""
    check_memory("batch_size" if shape.batch_size > 1 else "height", 4 * math.prod(shape.latent),
                 f"the latent batch {list(shape.latent)}", str(device))


def forward_flops(shape: WanShape) -> dict[str, float]:
    """Matmul FLOPs of one DiT forward, split into linear / self-attention / cross-attention."""
    c, n, b = shape.config, shape.tokens, shape.batch_size
    d, t = c.dim, c.text_len
    per_token = 4 * d * d + 2 * d * d + 2 * d * c.ffn_dim  # multiply-adds: self q,k,v,o; cross q,o; FFN
    per_text_token = 2 * d * d  # cross k,v
    embeddings = (t * (c.text_dim * d + d * d) + n * d * c.patch_numel * (c.in_dim + c.out_dim)  # text, patch, head
                  + c.freq_dim * d + d * d + d * 6 * d)  # time embedding and projection
    linear = 2 * b * (c.num_layers * (n * per_token + t * per_text_token) + embeddings)
    self_attn = 4 * b * c.num_layers * n * n * d  # H·D = dim
    cross_attn = 4 * b * c.num_layers * n * t * d
    return {"linear": float(linear), "self_attention": float(self_attn), "cross_attention": float(cross_attn)}


def phase_flops(shape: WanShape, rollout_steps: int, guidance: bool = True) -> dict[str, float]:
    """Model FLOPs of each phase of a student and a critic iteration (see the module docstring)."""
    f = forward_flops(shape)
    F = sum(f.values())
    jvp = 2 * f["linear"] + 3 * f["self_attention"] + 2 * f["cross_attention"]
    cfg = 2 if guidance else 1
    return {
        "scm.teacher": cfg * F, "scm.jvp": jvp, "scm.student_forward": F, "scm.backward": 2 * F,
        "dmd.rollout": rollout_steps * F, "dmd.scores": (1 + cfg) * F, "dmd.backward": 2 * F,
        "critic.rollout": rollout_steps * F, "critic.forward": F, "critic.backward": 2 * F,
    }


def random_dit(config: WanConfig, seed: int = 0, device: torch.device | str = "cpu") -> WanDiT:
    """A DiT (fp32, on the CPU) with the official init and a non-zero random head (the official zero head
    would make every output, tangent and gradient downstream of it trivially zero). Initialized on
    ``device`` (fast on a GPU), returned on the CPU."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        net = WanDiT(config)
    net.init_weights(generator)
    with torch.no_grad():
        net.head.head.weight.normal_(0, 0.02, generator=generator)
    return net.cpu()


def random_dit_on(config: WanConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    """``random_dit`` built where it runs, for sizes whose fp32 CPU copy would not fit (two 14B experts):
    on the meta device, cast (free), materialized empty on ``device`` in ``dtype`` and filled by the
    official init (``init_weights`` completes a meta-built model) plus a random head."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        net = WanDiT(config).to(dtype)
    net.to_empty(device=device)
    with torch.no_grad():
        net.init_weights(generator)
        net.head.head.weight.normal_(0, 0.02, generator=generator)
    return net


def gpu_settings(device: torch.device) -> None:
    if device.type == "cuda":  # TF32 for the few fp32 matmuls (time embedding), as the reference trainer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def console():
    """A rich console; wide when writing to a file or pipe (logs of device runs), so tables stay whole."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

