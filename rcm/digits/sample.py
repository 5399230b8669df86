"""`rcm sample` / `rcm sample digits`: clips of the digits teacher or of a distilled digits student.

    rcm sample                                              # the shipped teacher, one clip per digit
    rcm sample --checkpoint runs/digits-rcm/student_ema.safetensors --steps 2 --save-path s.gif

A .png grid (a row per clip, frames left to right), an animated .gif / .mp4 (clips side by side) or
the clips themselves (.npz: [N, T, H, W] in [0, 1] and the labels).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from rcm import ConfigError, check_memory, use_threads
from rcm.digits.config import DigitsSampleConfig
from rcm.digits import presets
from rcm.digits.data import NUM_CLASSES, clip_grid, to_unit
from rcm.digits.model import DEMO_SPEC
from rcm.media import tile_clips, write_image, write_video
from rcm.sample import DEFAULT_STUDENT_STEPS, SampleResult, SampleSettings, existing_path, resolve_device
from rcm.timing import progress_bar

SUFFIXES = (".png", ".gif", ".mp4", ".npz")


def _digits_kind(kind: str, meta: dict, path: Path) -> str:
    """``kind`` unless "auto": then the file's ``kind`` metadata, else told from what wrote it."""
    if kind != "auto":
        return kind
    kind = meta.get("kind")
    if kind in ("student", "teacher"):
        return kind
    if "method" in meta or "student" in meta:
        return "student"
    if "recipe" in meta:  # written by rcm.digits.teacher
        return "teacher"
    raise ConfigError("kind", f"cannot tell whether {path} is a teacher or a student (no 'kind' metadata); "
                       "pass --kind student or --kind teacher")


def check_labels(labels: list[int], num_samples: int | None) -> None:
    """Digits 0..9, as many as ``num_samples`` when both are given (ConfigErrors naming the field)."""
    if any(not 0 <= y < NUM_CLASSES for y in labels):
        raise ConfigError("labels", f"must be digits 0..{NUM_CLASSES - 1}, got {labels}")
    if labels and num_samples is not None and num_samples != len(labels):
        raise ConfigError("num_samples", f"{num_samples} != the {len(labels)} labels given; pass one of them")


class DigitsPipeline:
    """A digits teacher or student, loaded (``rcm.pipeline.load``): ``generate(labels)`` -> clips."""

    family = "digits"

    def __init__(self, path: Path | str | None = None, device: str = "cpu", kind: str = "auto"):
        from rcm.digits import model as digits_model
        from rcm.models import open_state_dict
        from rcm.sample import read_model_card

        path = existing_path("checkpoint", path if path is not None else digits_model.TEACHER_PATH)
        if path.suffix != ".safetensors":
            raise ConfigError("checkpoint", f"must be a .safetensors file written by rcm.digits.model.save_model, got {path}")
        if kind not in ("auto", "student", "teacher"):
            raise ConfigError("kind", f"must be auto, student or teacher, got {kind!r}")
        try:  # the header alone: a truncated, corrupt or non-safetensors file fails here, naming the file
            meta = open_state_dict(path).metadata
        except ValueError as e:
            raise ConfigError("checkpoint", str(e)) from e
        self.path, self.kind = path, _digits_kind(kind, meta, path)
        self.card = read_model_card(path, "checkpoint")
        self.device = resolve_device(device)
        try:
            self.model = digits_model.load_model(path, device=self.device)
        except (ValueError, RuntimeError) as e:  # keys or shapes that do not match the recorded architecture
            raise ConfigError("checkpoint", str(e)) from e
        self.last_steps: int | None = None  # what the last generate used (rcm sample reports them)
        self.last_labels: Tensor | None = None

    def sampling(self, steps: int | None = None, sigma_max: float | None = None) -> tuple[int, float]:
        """(steps, sigma_max) this pipeline samples with: the arguments, else the model card's, else the
        digits presets' for its kind."""
        from rcm.sample import sampling_defaults

        student = self.kind == "student"
        return sampling_defaults(
            self.kind, self.card, steps=steps, sigma_max=sigma_max,
            default_steps=DEFAULT_STUDENT_STEPS if student else presets.TEACHER_STEPS,
            default_sigma_max=presets.STUDENT_SIGMA_MAX if student else presets.TEACHER_SIGMA_MAX)  # fmt: skip

    def generate(self, labels=None, *, steps: int | None = None, seed: int = 0, num_samples: int | None = None,
                 sigma_max: float | None = None, mid_times=None, sampler: str | None = None,
                 guidance: float | None = None, shift: float | None = None, progress=None) -> Tensor:
        """Clips ``[N, 1, T, H, W]`` float32 on the CPU in [-1, 1] of ``labels`` (ints 0..9; default 0..9
        cycled over ``num_samples``, itself default 10). ``steps``: this sampler's (student 1..4, default 4;
        teacher default 50); ``sigma_max`` and a student's ``mid_times`` default to the model card's, else
        the digits presets'. A teacher's ``sampler`` (unipc / euler), ``guidance`` and ``shift`` default to
        the presets'. The noise is drawn on the CPU from ``seed``. ``progress(i, n)`` after each step."""
        from rcm.digits import model as digits_model
        from rcm.sample import card_student_mid_times

        labels = [] if labels is None else [int(y) for y in labels]
        check_labels(labels, num_samples)
        settings = SampleSettings(seed=seed, num_samples=num_samples, steps=steps, sigma_max=sigma_max,
                                  sampler=sampler, guidance=guidance, shift=shift)  # fmt: skip
        settings.check(self.kind)
        n = len(labels) or num_samples or NUM_CLASSES
        for where in {"cpu", str(self.device)}:  # the noise is drawn on the CPU
            check_memory("num_samples", DEMO_SPEC.batch_bytes(n), f"{n:,} clips", where)
        labels = torch.tensor(labels, dtype=torch.long) if labels else torch.arange(n) % NUM_CLASSES
        generator = torch.Generator().manual_seed(seed)
        if self.kind == "student":
            steps, sigma_max = self.sampling(steps, sigma_max)
            if mid_times is None:
                mid_times = card_student_mid_times(self.card, steps)  # None: the digits presets' for this step count
            clips = digits_model.sample_student(self.model, labels, generator, steps=steps, sigma_max=sigma_max,
                                                mid_times=mid_times, progress=progress)  # fmt: skip
        else:
            if mid_times is not None:
                raise ConfigError("mid_times", "applies to a student; this checkpoint is a teacher")
            steps, sigma_max = self.sampling(steps, sigma_max)
            teacher = digits_model.TeacherSampling(
                steps=steps, sampler=settings.sampler, sigma_max=sigma_max,
                guidance=presets.TEACHER_GUIDANCE if guidance is None else guidance,
                shift=presets.TEACHER_SHIFT if shift is None else shift)  # fmt: skip
            clips = digits_model.sample_teacher(self.model, labels, generator, teacher, progress=progress)
        self.last_steps, self.last_labels = steps, labels
        return clips.cpu()


def sample_digits(cfg: DigitsSampleConfig, console=None) -> SampleResult:
    """`rcm sample` / `rcm sample digits`: clips of a digits teacher or student (see the module docstring),
    through ``DigitsPipeline``; every bad argument is a ``ConfigError`` naming its field (a missing path:
    ``PathArgumentError``)."""
    import numpy as np

    from rich.console import Console

    console = console or Console()
    save_path = cfg.save_path_or("samples.png", SUFFIXES, "the digits demo")
    check_labels(list(cfg.labels), cfg.num_samples)  # before the model is read
    if cfg.fps is not None and save_path.suffix.lower() in (".png", ".npz"):
        raise ConfigError("fps", f"applies to a .gif or .mp4; {save_path} is no video")
    use_threads("threads", cfg.threads)
    resolve_device(cfg.device)  # cuda asked for without CUDA: an error naming --device, before the file is read
    pipe = DigitsPipeline(cfg.checkpoint, device=cfg.device, kind=cfg.kind)
    cfg.check(pipe.kind)
    kind = pipe.kind
    start = time.perf_counter()
    with progress_bar(console) as progress:
        task = progress.add_task(f"digits {kind}", total=pipe.sampling(cfg.steps, cfg.sigma_max)[0])
        update = lambda i, _: progress.update(task, completed=i)  # noqa: E731
        clips = pipe.generate(cfg.labels or None, steps=cfg.steps, seed=cfg.seed, num_samples=cfg.num_samples,
                              sigma_max=cfg.sigma_max, sampler=cfg.sampler if kind == "teacher" else None,
                              guidance=cfg.guidance, shift=cfg.shift, progress=update)  # fmt: skip
    seconds = time.perf_counter() - start
    labels, n = pipe.last_labels, len(clips)

    suffix = save_path.suffix.lower()
    save_path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        write_image(save_path, clip_grid(clips))
    elif suffix == ".npz":
        np.savez(save_path, clips=to_unit(clips)[:, 0].numpy().astype(np.float32), labels=labels.numpy())
    else:
        write_video(save_path, tile_clips(clips), fps=cfg.fps or presets.FPS)
    console.print(f"{n} digit clips ({kind}, {pipe.last_steps} steps, labels {labels.tolist()}) in {seconds:.1f} s "
                  f"-> {save_path}")
    return SampleResult([save_path], kind, dit_seconds_per_step=seconds / pipe.last_steps)
