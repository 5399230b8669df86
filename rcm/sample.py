"""``rcm sample``: generate with a teacher or a distilled student, digits demo or Wan2.1 text-to-video.

    rcm sample                                              # shipped digits teacher, one clip per class
    rcm sample --checkpoint runs/distill/student.safetensors --num-steps 2 --save-path s.gif
    rcm sample --model wan2.1-t2v-1.3b --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt \\
        --vae-path Wan2.1_VAE.pth --text-encoder-path models_t5_umt5-xxl-enc-bf16.pth \\
        --prompt "A cat surfing a wave" --num-steps 4 --num-samples 2 --save-path out.mp4

Students use the few-step consistency sampler (RCM_METHOD.md §5.2, ``rcm.samplers.sample_consistency``:
TrigFlow times [arctan σ_max, 1.5, 1.4, 1.0][:N] then 0, re-noising with fresh noise between steps;
the rCM release's standalone RF-form script is the same algorithm, except that it starts from ρ_0·z
rather than z: x_ρ differs by the factor sin t_0 = 1/√(1 + 1/σ_max²), 1 − 8e-5 at σ_max = 80).
Teachers use flow UniPC or Euler over Wan's shifted schedule with classifier-free guidance (§5.3).

The Wan pipeline, in the order that keeps GPU memory lowest: the umT5 encoder is loaded, encodes
the prompt (and the negative prompt, for a guided teacher) and is freed; the DiT is loaded (strict,
any layout: ``rcm.models.checkpoint.load_dit``) and samples every latent; it is freed and the VAE
decodes them chunk by chunk (bounded memory). Each sample ``i`` uses seed ``seed + i`` (so one
sample can be redone alone) and is written as ``<save-path stem>_i.mp4`` when there are several.
bf16 on CUDA, fp32 on CPU. ``--model wan`` takes the DiT's architecture from its files (metadata,
config.json or shapes): custom sizes, and the tiny random models of the tests.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rcm.models.text_encoder import WAN_NEGATIVE_PROMPT

__all__ = [
    "PathArgumentError",
    "SampleConfig",
    "SampleResult",
    "WAN_SIZES",
    "decode_videos",
    "sample",
    "sample_wan_latent",
    "video_size",
    "result_json",
    "write_video",
]

# (height, width) of Wan2.1's supported sizes (official `SIZE_CONFIGS`).
WAN_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (480, 832), "9:16": (832, 480), "1:1": (624, 624)},
    "720p": {"16:9": (720, 1280), "9:16": (1280, 720), "1:1": (960, 960)},
}
WAN_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan")
MAX_STUDENT_STEPS = 4  # the reference's mid-times (1.5, 1.4, 1.0) cover 1..4 steps
VIDEO_SUFFIXES = (".mp4", ".gif")
DIGITS_SUFFIXES = (".png", ".gif", ".mp4", ".npz")


class PathArgumentError(FileNotFoundError, ValueError):
    """A path argument that does not exist (both a FileNotFoundError and a ValueError)."""


@dataclass
class SampleConfig:
    """Sample a teacher or a distilled student: the digits demo, or Wan2.1 text-to-video."""

    model: Literal["digits", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan"] = "digits"
    """digits: the demo; wan2.1-t2v-*: the named Wan2.1 architecture; wan: architecture from the DiT files."""
    kind: Literal["auto", "student", "teacher"] = "auto"
    """student (few-step consistency sampler) or teacher (UniPC/Euler + CFG); auto: from the file's metadata
    (Wan: rCM `net.` checkpoints are students, other Wan files without a 'kind' are teachers)."""
    save_path: Path | None = None
    """digits: .png (grid), .gif, .mp4 or .npz (clips in [0,1] [N,T,H,W] + labels); Wan: .mp4 or .gif.
    Default samples.png / out.mp4."""
    seed: int = 0
    """noise seed; sample i uses seed + i."""
    num_samples: int | None = None
    """digits: default one per class (or len(labels)); Wan: default 1, saved as out_0.mp4, out_1.mp4, ..."""

    # student
    num_steps: int = 4
    """student sampling steps, 1..4."""
    sigma_max: float | None = None
    """starting noise level σ_max; default 80 for a student (rCM: 120 at 720p), 5000 for a teacher."""

    # teacher
    sampler: Literal["unipc", "euler"] = "unipc"
    """teacher sampler (flow UniPC, order 2, or Euler)."""
    steps: int = 50
    """teacher sampling steps."""
    guidance: float | None = None
    """CFG weight (> 1 guides); default 5 for Wan, the demo teacher's 3 for digits."""
    shift: float | None = None
    """schedule shift; default 5 for Wan, the demo teacher's 1 for digits."""

    # digits
    checkpoint: Path | None = None
    """digits model (rcm.demo.save_model safetensors); default the shipped teacher."""
    labels: tuple[int, ...] = ()
    """digits classes 0..9 to sample; default 0..9 cycled over num_samples."""

    # Wan
    dit_path: Path | None = None
    """DiT: official .safetensors/.pth/sharded folder, diffusers transformer/ folder, or rCM .pt."""
    vae_path: Path | None = None
    """VAE: Wan2.1_VAE.pth or a diffusers vae/ folder."""
    text_encoder_path: Path | None = None
    """umT5: models_t5_umt5-xxl-enc-bf16.pth, a transformers folder, or a diffusers pipeline root."""
    tokenizer_path: Path | None = None
    """umT5 tokenizer folder; default found next to the text encoder."""
    prompt: str = ""
    """Wan: the text to generate a video of."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """teacher CFG negative prompt (Wan's default)."""
    resolution: Literal["480p", "720p"] = "480p"
    """Wan video size: 480p (832x480 at 16:9) or 720p (1280x720)."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    """Wan aspect ratio (1:1 is 624x624 / 960x960)."""
    height: int | None = None
    """explicit video height (overrides resolution/aspect-ratio; a multiple of 16)."""
    width: int | None = None
    """explicit video width (overrides resolution/aspect-ratio; a multiple of 16)."""
    num_frames: int = 81
    """video frames, 1 + 4k."""
    fps: int = 16
    """frames per second of the written video (digits: at most 8)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Wan: auto = cuda when available; bf16 on CUDA, fp32 on the CPU (digits always run on the CPU)."""
    vae_chunk_size: int = 1
    """latent frames per VAE decode chunk (1: Wan's schedule, least memory)."""
    compile: bool = False
    """Wan: torch.compile each DiT block (inductor): 4-step 480p sampling 2.08 s instead of 2.92 s on an H100,
    after a one-off compile (docs/benchmarks.md)."""


@dataclass
class SampleResult:
    """What ``sample`` wrote, and how long it took (``dit_seconds_per_step``: mean over every network
    step of every sample; ``peak_memory_gb``: CUDA peak after text encoding, None on CPU)."""

    paths: list[Path]
    kind: str
    dit_seconds_per_step: float | None = None
    vae_decode_seconds: float | None = None
    peak_memory_gb: float | None = None
    text_encode_seconds: float | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Validation


def _bad(arg: str, message: str) -> ValueError:
    return ValueError(f"--{arg.replace('_', '-')}: {message}")


def _existing(arg: str, path: Path | None, required: bool = True) -> Path | None:
    if path is None:
        if required:
            raise _bad(arg, "is required for this model")
        return None
    path = Path(path)
    if not path.exists():
        raise PathArgumentError(f"--{arg.replace('_', '-')}: no such file or folder: {path}")
    return path


def _check_common(cfg: SampleConfig, kind: str) -> None:
    if cfg.seed < 0:
        raise _bad("seed", f"must be >= 0, got {cfg.seed}")
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise _bad("num_samples", f"must be >= 1, got {cfg.num_samples}")
    if cfg.sigma_max is not None and not (math.isfinite(cfg.sigma_max) and cfg.sigma_max > 0):
        raise _bad("sigma_max", f"must be a finite number > 0, got {cfg.sigma_max}")
    if kind == "student" and not 1 <= cfg.num_steps <= MAX_STUDENT_STEPS:
        raise _bad("num_steps", f"must be in 1..{MAX_STUDENT_STEPS}, got {cfg.num_steps}")
    if kind == "teacher":
        if cfg.steps < 1:
            raise _bad("steps", f"must be >= 1, got {cfg.steps}")
        if cfg.guidance is not None and not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
            raise _bad("guidance", f"must be a finite number >= 0, got {cfg.guidance}")
        if cfg.shift is not None and not (math.isfinite(cfg.shift) and cfg.shift > 0):
            raise _bad("shift", f"must be a finite number > 0, got {cfg.shift}")
    if cfg.sampler not in ("unipc", "euler"):
        raise _bad("sampler", f"must be unipc or euler, got {cfg.sampler!r}")
    if cfg.fps < 1:
        raise _bad("fps", f"must be >= 1, got {cfg.fps}")


def resolve_device(name: str) -> torch.device:
    """A ``--device`` value (auto, cpu, cuda) as a device: auto = cuda when available; under torchrun
    (LOCAL_RANK set) the rank's own GPU. A missing GPU asked for by name is an error naming --device."""
    if name not in ("auto", "cpu", "cuda"):
        raise _bad("device", f"must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise _bad("device", "cuda was asked for but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def _save_path(cfg: SampleConfig, default: str, suffixes: tuple[str, ...]) -> Path:
    path = Path(cfg.save_path) if cfg.save_path is not None else Path(default)
    if path.suffix.lower() not in suffixes:
        raise _bad("save_path", f"must end in {', '.join(suffixes)} for --model {cfg.model}, got {path}")
    return path


def video_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of a Wan2.1 size, e.g. ``('480p', '16:9') -> (480, 832)``."""
    if resolution not in WAN_SIZES:
        raise _bad("resolution", f"must be one of {', '.join(WAN_SIZES)}, got {resolution!r}")
    if aspect_ratio not in WAN_SIZES[resolution]:
        raise _bad("aspect_ratio", f"must be one of {', '.join(WAN_SIZES[resolution])}, got {aspect_ratio!r}")
    return WAN_SIZES[resolution][aspect_ratio]


# ----------------------------------------------------------------------------------------------------
# Output


def _progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console)  # fmt: skip


def write_video(path: str | Path, frames, fps: int = 16) -> Path:
    """Writes uint8 frames ``[T, H, W]`` or ``[T, H, W, 3]`` (numpy or tensor) as ``.mp4`` (H.264,
    yuv420p, through imageio-ffmpeg) or ``.gif`` (looping)."""
    import imageio.v3 as iio
    import numpy as np

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


def _to_uint8(video: Tensor) -> Tensor:
    """Values in [-1, 1] -> uint8 [0, 255] (rounded), same shape."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _tile_frames(clips: Tensor, scale: int = 4, pad: int = 1, max_cols: int = 10) -> Tensor:
    """Clips ``[N, 1, T, H, W]`` in [-1, 1] -> uint8 frames ``[T, H', W']``: the N clips side by side
    (rows of ``max_cols``), each pixel ``scale``², grey borders, padded to multiples of 16."""
    n, _, t, h, w = clips.shape
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    out = torch.full((t, rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=torch.uint8)
    pix = _to_uint8(clips[:, 0].cpu())
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[:, y : y + h, x : x + w] = pix[i]
    out = out.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    th, tw = -out.shape[1] % 16, -out.shape[2] % 16
    return torch.nn.functional.pad(out, (0, tw, 0, th), value=128)


def _numbered(path: Path, i: int, n: int) -> Path:
    return path if n == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")


# ----------------------------------------------------------------------------------------------------
# Digits demo


def _digits_kind(cfg: SampleConfig, meta: dict, path: Path) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    kind = meta.get("kind")
    if kind in ("student", "teacher"):
        return kind
    if "method" in meta or "student" in meta:
        return "student"
    if "recipe" in meta:  # written by rcm.demo.train_teacher
        return "teacher"
    raise _bad("kind", f"cannot tell whether {path} is a teacher or a student (no 'kind' metadata); "
                       "pass --kind student or --kind teacher")


def _sample_digits(cfg: SampleConfig, console) -> SampleResult:
    import numpy as np

    from rcm import demo
    from rcm.data import NUM_CLASSES, clip_grid, to_unit

    if cfg.prompt:
        raise _bad("prompt", "applies to the Wan models; the digits demo is conditioned on --labels")
    for arg in ("dit_path", "vae_path", "text_encoder_path"):
        if getattr(cfg, arg) is not None:
            raise _bad(arg, "applies to the Wan models, not --model digits (use --checkpoint)")
    path = _existing("checkpoint", cfg.checkpoint if cfg.checkpoint is not None else demo.TEACHER_PATH)
    if path.suffix != ".safetensors":
        raise _bad("checkpoint", f"must be a .safetensors file written by rcm.demo.save_model, got {path}")
    save_path = _save_path(cfg, "samples.png", DIGITS_SUFFIXES)
    if any(not 0 <= y < NUM_CLASSES for y in cfg.labels):
        raise _bad("labels", f"must be digits 0..{NUM_CLASSES - 1}, got {list(cfg.labels)}")
    if cfg.labels and cfg.num_samples is not None and cfg.num_samples != len(cfg.labels):
        raise _bad("num_samples", f"{cfg.num_samples} != the {len(cfg.labels)} --labels given; pass one of them")
    try:  # the header alone: a truncated, corrupt or non-safetensors file fails here, naming the file
        from rcm.models.checkpoint import open_state_dict

        meta = open_state_dict(path).metadata
    except ValueError as e:
        raise _bad("checkpoint", str(e)) from e
    kind = _digits_kind(cfg, meta, path)
    _check_common(cfg, kind)
    try:
        model = demo.load_model(path)
    except (ValueError, RuntimeError) as e:  # keys or shapes that do not match the recorded architecture
        raise _bad("checkpoint", str(e)) from e

    n = len(cfg.labels) or cfg.num_samples or NUM_CLASSES
    labels = torch.tensor(cfg.labels, dtype=torch.long) if cfg.labels else torch.arange(n) % NUM_CLASSES
    generator = torch.Generator().manual_seed(cfg.seed)
    total = cfg.num_steps if kind == "student" else cfg.steps
    start = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task(f"digits {kind}", total=total)
        update = lambda i, _: progress.update(task, completed=i)  # noqa: E731
        if kind == "student":
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else 80.0
            clips = demo.sample_student(model, labels, generator, steps=cfg.num_steps, sigma_max=sigma_max,
                                        progress=update)  # fmt: skip
        else:
            d = demo.TeacherSampling()
            teacher = demo.TeacherSampling(
                steps=cfg.steps, sampler=cfg.sampler,
                guidance=d.guidance if cfg.guidance is None else cfg.guidance,
                shift=d.shift if cfg.shift is None else cfg.shift,
                sigma_max=d.sigma_max if cfg.sigma_max is None else cfg.sigma_max)  # fmt: skip
            clips = demo.sample_teacher(model, labels, generator, teacher, progress=update)
    seconds = time.perf_counter() - start

    suffix = save_path.suffix.lower()
    save_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        import imageio.v3 as iio

        iio.imwrite(save_path, clip_grid(clips))
    elif suffix == ".npz":
        np.savez(save_path, clips=to_unit(clips)[:, 0].numpy().astype(np.float32), labels=labels.numpy())
    else:
        write_video(save_path, _tile_frames(clips), fps=min(cfg.fps, 8))
    console.print(f"{n} digit clips ({kind}, labels {labels.tolist()}) in {seconds:.1f} s -> {save_path}")
    return SampleResult([save_path], kind, dit_seconds_per_step=seconds / total)


# ----------------------------------------------------------------------------------------------------
# Wan


@torch.no_grad()
def sample_wan_latent(dit, context: Tensor, noise: Tensor, *, kind: str, generator: torch.Generator,
                      num_steps: int = 4, sigma_max: float | None = None, sampler: str = "unipc", steps: int = 50,
                      guidance: float = 5.0, shift: float = 5.0, negative_context: Tensor | None = None,
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
        times = consistency_times(num_steps, sigma_max=80.0 if sigma_max is None else sigma_max)
        out = sample_consistency(student_denoiser(dit, context), noise, times, generator=generator, progress=progress)
    elif kind == "teacher":
        velocity = teacher_velocity(dit, context, guidance=guidance, negative_context=negative_context)
        times = shifted_flow_times(steps, shift=shift, sigma_max=5000.0 if sigma_max is None else sigma_max)
        run = {"unipc": sample_unipc, "euler": sample_euler}[sampler]
        out = run(velocity, noise, times, progress=progress)
    else:
        raise ValueError(f"kind must be 'student' or 'teacher', got {kind!r}")
    return out.float()


@torch.no_grad()
def decode_videos(vae, latent: Tensor, *, chunk_size: int = 1) -> Tensor:
    """Latents ``[B, 16, T, h, w]`` -> uint8 videos ``[B, 1 + 4(T-1), 8h, 8w, 3]`` on the CPU."""
    video = vae.decode(latent.to(vae.quant_conv.weight.device), chunk_size=chunk_size)  # [B, 3, T, H, W]
    return _to_uint8(video).permute(0, 2, 3, 4, 1).cpu()


def _wan_kind(cfg: SampleConfig, dit_path: Path) -> str:
    from rcm.models.checkpoint import detect_dit_layout, dit_weight_files, open_state_dict

    if cfg.kind != "auto":
        return cfg.kind
    try:
        raw = open_state_dict(dit_weight_files(dit_path).files)  # headers only
    except ValueError as e:
        raise _bad("dit_path", str(e)) from e
    kind = raw.metadata.get("kind")
    if kind in ("student", "teacher"):
        return kind
    return "student" if detect_dit_layout(raw) == "rcm" else "teacher"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_wan(cfg: SampleConfig, console) -> SampleResult:
    from rcm.models.checkpoint import load_dit, read_dit_config
    from rcm.models.text_encoder import load_text_encoder
    from rcm.models.vae import load_vae
    from rcm.models.wan import WAN_CONFIGS

    if cfg.labels:
        raise _bad("labels", "applies to --model digits; Wan models take --prompt")
    if cfg.checkpoint is not None:
        raise _bad("checkpoint", "applies to --model digits; Wan models take --dit-path, --vae-path, --text-encoder-path")
    dit_path = _existing("dit_path", cfg.dit_path)
    vae_path = _existing("vae_path", cfg.vae_path)
    te_path = _existing("text_encoder_path", cfg.text_encoder_path)
    tok_path = _existing("tokenizer_path", cfg.tokenizer_path, required=False)
    if not cfg.prompt.strip():
        raise _bad("prompt", "is required (the text to generate a video of)")
    save_path = _save_path(cfg, "out.mp4", VIDEO_SUFFIXES)
    if (cfg.height is None) != (cfg.width is None):
        raise _bad("height" if cfg.height is None else "width", "give both --height and --width, or neither")
    height, width = (cfg.height, cfg.width) if cfg.height is not None else video_size(cfg.resolution, cfg.aspect_ratio)
    if cfg.num_frames < 1 or (cfg.num_frames - 1) % 4:
        raise _bad("num_frames", f"must be 1 + 4k (1, 5, ..., 81), got {cfg.num_frames}")
    if cfg.vae_chunk_size < 1:
        raise _bad("vae_chunk_size", f"must be >= 1, got {cfg.vae_chunk_size}")
    kind = _wan_kind(cfg, dit_path)
    _check_common(cfg, kind)
    device = resolve_device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        config = WAN_CONFIGS[cfg.model] if cfg.model != "wan" else read_dit_config(dit_path)
    except ValueError as e:
        raise _bad("dit_path", str(e)) from e
    for name, size, patch in (("height", height, config.patch_size[1]), ("width", width, config.patch_size[2])):
        if size < 8 * patch or size % (8 * patch):  # the Wan VAE's 8x, then the DiT's patch
            raise _bad(name, f"must be a positive multiple of {8 * patch} (VAE 8x times patch {patch}), got {size}")
    try:  # headers only: a wrong DiT file fails here, before minutes of loading umT5-XXL
        load_dit(dit_path, config=config, device="meta")
    except ValueError as e:
        raise ValueError(f"--dit-path: {e}") from e
    if vae_path.is_file():  # headers only, likewise: a truncated or corrupt VAE file
        from rcm.models.checkpoint import open_state_dict

        try:
            open_state_dict(vae_path)
        except ValueError as e:
            raise _bad("vae_path", str(e)) from e
    num_samples = cfg.num_samples or 1
    guidance = 5.0 if cfg.guidance is None else cfg.guidance
    shift = 5.0 if cfg.shift is None else cfg.shift
    guided = kind == "teacher" and guidance > 1

    # 1. Text: encode, then free the encoder before anything else is on the device.
    t0 = time.perf_counter()
    with console.status("loading the text encoder and encoding the prompt"):
        try:
            encoder = load_text_encoder(te_path, tokenizer_path=tok_path, dtype=dtype, device=device,
                                        text_len=config.text_len)  # fmt: skip
        except ValueError as e:
            raise _bad("text_encoder_path", str(e)) from e
        if encoder.dim != config.text_dim:
            raise ValueError(f"--text-encoder-path: its width {encoder.dim} != the DiT's text_dim {config.text_dim}")
        context = encoder.encode([cfg.prompt], dtype=dtype)
        negative = encoder.encode([cfg.negative_prompt], dtype=dtype) if guided else None
        encoder.offload()
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text_seconds = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # 2. Weights. The VAE is small (0.25 GB in bf16); it is loaded first to fail early on a bad file.
    with console.status("loading the VAE and the DiT"):
        try:
            vae = load_vae(vae_path, dtype=dtype, device=device)
        except ValueError as e:
            raise _bad("vae_path", str(e)) from e
        z = vae.config.z_dim
        if config.in_dim != z or config.out_dim != z:
            raise ValueError(f"--vae-path: the VAE has {z} latent channels, the DiT in/out {config.in_dim}/{config.out_dim}")
        sf = vae.config.spatial_factor
        if height % (sf * config.patch_size[1]) or width % (sf * config.patch_size[2]):
            raise _bad("vae_path", f"its {sf}x spatial factor does not divide {height}x{width} into whole patches")
        dit = load_dit(dit_path, config=config, dtype=dtype, device=device).eval().requires_grad_(False)
        if cfg.compile:
            from rcm.parallel import compile_blocks

            compile_blocks(dit)
    latent_shape = (1, *vae.config.latent_shape(cfg.num_frames, height, width))
    tokens = math.prod(latent_shape[2:]) // config.patch_numel
    console.print(f"Wan {kind}: {cfg.model}, {sum(p.numel() for p in dit.parameters()) / 1e6:,.0f}M parameters "
                  f"({dtype}, {device}), {cfg.num_frames} frames {height}x{width} -> latent "
                  f"{list(latent_shape[1:])}, {tokens} tokens")  # fmt: skip

    # 3. Sampling: every latent first, so the DiT can be freed before decoding.
    per_sample = cfg.num_steps if kind == "student" else cfg.steps
    step_times: list[float] = []
    latents = []
    with _progress(console) as progress:
        for i in range(num_samples):
            generator = torch.Generator().manual_seed(cfg.seed + i)
            noise = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device)
            task = progress.add_task(f"sample {i} ({kind})", total=per_sample)
            _sync(device)
            last = [time.perf_counter()]

            def tick(step, _total, task=task, last=last):
                _sync(device)
                now = time.perf_counter()
                step_times.append(now - last[0])
                last[0] = now
                progress.update(task, completed=step)

            latents.append(sample_wan_latent(
                dit, context, noise, kind=kind, generator=generator, num_steps=cfg.num_steps,
                sigma_max=cfg.sigma_max, sampler=cfg.sampler, steps=cfg.steps, guidance=guidance, shift=shift,
                negative_context=negative, progress=tick).cpu())  # fmt: skip
    del dit
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. Decode and write.
    paths, decode_seconds = [], []
    with _progress(console) as progress:
        task = progress.add_task("VAE decode", total=num_samples)
        for i, latent in enumerate(latents):
            _sync(device)
            t0 = time.perf_counter()
            frames = decode_videos(vae, latent, chunk_size=cfg.vae_chunk_size)[0]
            _sync(device)
            decode_seconds.append(time.perf_counter() - t0)
            paths.append(write_video(_numbered(save_path, i, num_samples), frames, fps=cfg.fps))
            progress.update(task, advance=1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = SampleResult(
        paths, kind, dit_seconds_per_step=sum(step_times) / max(1, len(step_times)),
        vae_decode_seconds=sum(decode_seconds) / num_samples, peak_memory_gb=peak, text_encode_seconds=text_seconds,
        extra={"tokens": tokens, "latent_shape": list(latent_shape), "height": height, "width": width,
               "step_seconds": [round(s, 4) for s in step_times],
               "decode_seconds": [round(s, 3) for s in decode_seconds]})  # fmt: skip
    line = (f"DiT {result.dit_seconds_per_step:.3f} s/step, VAE decode {result.vae_decode_seconds:.2f} s/video, "
            f"text encoding {text_seconds:.1f} s")
    if peak is not None:
        line += f", peak GPU memory after text encoding {peak:.2f} GiB"
    console.print(line)
    console.print("wrote " + ", ".join(map(str, paths)))
    return result


# ----------------------------------------------------------------------------------------------------


def sample(cfg: SampleConfig, console=None) -> SampleResult:
    """Generate samples (see the module docstring); every bad argument is a ``ValueError`` naming it
    (a missing path: ``PathArgumentError``, also a ``FileNotFoundError``)."""
    from rich.console import Console

    console = console or Console()
    if cfg.model == "digits":
        return _sample_digits(cfg, console)
    if cfg.model in WAN_MODELS:
        return _sample_wan(cfg, console)
    raise _bad("model", f"must be digits, {', '.join(WAN_MODELS)}; got {cfg.model!r}")


def result_json(result: SampleResult) -> str:
    """The result as JSON (paths as strings), for scripts."""
    d = {k: v for k, v in result.__dict__.items()}
    d["paths"] = [str(p) for p in result.paths]
    return json.dumps(d)
