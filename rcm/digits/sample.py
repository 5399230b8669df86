"""`rcm sample` / `rcm sample digits`: clips of the digits teacher or of a distilled digits student.

    rcm sample                                              # the shipped teacher, one clip per digit
    rcm sample --checkpoint runs/digits-rcm/student_ema.safetensors --num-steps 2 --save-path s.gif

A .png grid (a row per clip, frames left to right), an animated .gif / .mp4 (clips side by side) or
the clips themselves (.npz: [N, T, H, W] in [0, 1] and the labels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rcm import ConfigError, check_memory, use_threads
from rcm.digits import presets
from rcm.digits.data import NUM_CLASSES, clip_grid, to_unit
from rcm.digits.model import DEMO_SPEC
from rcm.media import tile_clips, write_image, write_video
from rcm.sample import Device, SampleResult, SampleSettings, existing_path, resolve_device
from rcm.timing import progress_bar

SUFFIXES = (".png", ".gif", ".mp4", ".npz")


@dataclass
class DigitsSampleConfig(SampleSettings):
    """Sample the digits teacher or a distilled digits student."""

    checkpoint: Path | None = None
    """a digits model (rcm.digits.model.save_model safetensors); default the shipped teacher."""
    labels: tuple[int, ...] = ()
    """classes 0..9 to sample; default 0..9 cycled over num_samples."""
    save_path: Path | None = None
    """.png (grid), .gif, .mp4 or .npz (clips in [0,1] [N,T,H,W] + labels); default samples.png."""
    device: Device = "auto"
    """auto: cuda when available, else cpu (the noise is drawn on the CPU: a seed gives the same clips)."""
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default)."""


def _digits_kind(cfg: DigitsSampleConfig, meta: dict, path: Path) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    kind = meta.get("kind")
    if kind in ("student", "teacher"):
        return kind
    if "method" in meta or "student" in meta:
        return "student"
    if "recipe" in meta:  # written by rcm.digits.teacher
        return "teacher"
    raise ConfigError("kind", f"cannot tell whether {path} is a teacher or a student (no 'kind' metadata); "
                       "pass --kind student or --kind teacher")


def sample_digits(cfg: DigitsSampleConfig, console=None) -> SampleResult:
    """`rcm sample` / `rcm sample digits`: clips of a digits teacher or student (see the module docstring);
    every bad argument is a ``ConfigError`` naming its field (a missing path: ``PathArgumentError``)."""
    import numpy as np

    from rich.console import Console

    from rcm.digits import model as digits_model

    console = console or Console()

    path = existing_path("checkpoint", cfg.checkpoint if cfg.checkpoint is not None else digits_model.TEACHER_PATH)
    if path.suffix != ".safetensors":
        raise ConfigError("checkpoint", f"must be a .safetensors file written by rcm.digits.model.save_model, got {path}")
    save_path = cfg.save_path_or("samples.png", SUFFIXES, "the digits demo")
    if any(not 0 <= y < NUM_CLASSES for y in cfg.labels):
        raise ConfigError("labels", f"must be digits 0..{NUM_CLASSES - 1}, got {list(cfg.labels)}")
    if cfg.labels and cfg.num_samples is not None and cfg.num_samples != len(cfg.labels):
        raise ConfigError("num_samples", f"{cfg.num_samples} != the {len(cfg.labels)} --labels given; pass one of them")
    try:  # the header alone: a truncated, corrupt or non-safetensors file fails here, naming the file
        from rcm.models import open_state_dict

        meta = open_state_dict(path).metadata
    except ValueError as e:
        raise ConfigError("checkpoint", str(e)) from e
    kind = _digits_kind(cfg, meta, path)
    cfg.check(kind)
    use_threads("threads", cfg.threads)
    device = resolve_device(cfg.device)
    n = len(cfg.labels) or cfg.num_samples or NUM_CLASSES
    for where in {"cpu", str(device)}:  # the noise is drawn on the CPU
        check_memory("num_samples", DEMO_SPEC.batch_bytes(n), f"{n:,} clips", where)
    try:
        model = digits_model.load_model(path, device=device)
    except (ValueError, RuntimeError) as e:  # keys or shapes that do not match the recorded architecture
        raise ConfigError("checkpoint", str(e)) from e

    labels = torch.tensor(cfg.labels, dtype=torch.long) if cfg.labels else torch.arange(n) % NUM_CLASSES
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = presets.TEACHER_STEPS if cfg.steps is None else cfg.steps
    total = cfg.num_steps if kind == "student" else steps
    start = time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task(f"digits {kind}", total=total)
        update = lambda i, _: progress.update(task, completed=i)  # noqa: E731
        if kind == "student":
            sigma_max = cfg.sigma_max if cfg.sigma_max is not None else presets.STUDENT_SIGMA_MAX
            clips = digits_model.sample_student(model, labels, generator, steps=cfg.num_steps, sigma_max=sigma_max,
                                                progress=update).cpu()  # mid-times: the digits presets' per step count
        else:
            d = digits_model.TeacherSampling()
            teacher = digits_model.TeacherSampling(
                steps=steps, sampler=cfg.sampler,
                guidance=d.guidance if cfg.guidance is None else cfg.guidance,
                shift=d.shift if cfg.shift is None else cfg.shift,
                sigma_max=d.sigma_max if cfg.sigma_max is None else cfg.sigma_max)  # fmt: skip
            clips = digits_model.sample_teacher(model, labels, generator, teacher, progress=update).cpu()
    seconds = time.perf_counter() - start

    suffix = save_path.suffix.lower()
    save_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        write_image(save_path, clip_grid(clips))
    elif suffix == ".npz":
        np.savez(save_path, clips=to_unit(clips)[:, 0].numpy().astype(np.float32), labels=labels.numpy())
    else:
        write_video(save_path, tile_clips(clips), fps=min(cfg.fps or presets.FPS, presets.FPS))
    console.print(f"{n} digit clips ({kind}, labels {labels.tolist()}) in {seconds:.1f} s -> {save_path}")
    return SampleResult([save_path], kind, dit_seconds_per_step=seconds / total)


