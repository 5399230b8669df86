"""`rcm sample`: what sampling a teacher or a distilled student means for every application.

    rcm sample                                              # shipped digits teacher, one clip per class
    rcm sample --checkpoint runs/digits-rcm/student_ema.safetensors --steps 2 --save-path s.gif
    rcm sample wan2.1-t2v-1.3b --dit-path rCM_Wan2.1_T2V_1.3B_480p.pt \\
        --vae-path Wan2.1_VAE.pth --text-encoder-path models_t5_umt5-xxl-enc-bf16.pth \\
        --prompt "A cat surfing a wave" --steps 4 --num-samples 2 --save-path out.mp4

Students use the few-step consistency sampler, teachers flow UniPC or Euler with classifier-free
guidance. Each application's command extends ``SampleSettings``: ``rcm.digits.sample`` (`rcm sample` /
`rcm sample digits`) and ``rcm.wan.sample`` (`rcm sample wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan`), and
runs that application's pipeline (``rcm.pipeline``: the one implementation of sampling). ``--steps`` is the
sampler's step count for the checkpoint's kind. Unset values (None) take the model card's (a student's
``<stem>.card.json``, ``rcm.checkpoint.card``), else the application's own defaults (its ``presets``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rcm import MAX_SAMPLING_STEPS, ConfigError, PathArgumentError, check_count, check_number, check_seed

__all__ = ["DEFAULT_STUDENT_STEPS", "MAX_STUDENT_STEPS", "SampleResult", "SampleSettings", "card_sampling",
           "card_student_mid_times", "check_device", "check_steps", "config_devices", "existing_path", "numbered",
           "read_model_card", "resolve_device", "result_json", "sampling_defaults"]

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]


def check_device(name: str) -> str:
    """A ``--device`` value spelled right (auto, cpu, cuda), without importing torch: what a config checks
    when it is built; whether CUDA is there is checked when the command resolves it (``resolve_device``)."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda, got {name!r}")
    return name


def config_devices(name: str) -> set[str]:
    """The devices a config checks its first allocations against when it is built: the CPU, and the GPU when
    ``cuda`` is named (checked to exist then, importing torch). ``auto`` is resolved when the command runs
    (``resolve_device``): a command's help builds its default config, and must not import torch for that."""
    return {"cpu", str(resolve_device(name))} if check_device(name) == "cuda" else {"cpu"}


def resolve_device(name: str) -> torch.device:
    """A ``--device`` value (auto, cpu, cuda) as a device: auto = cuda when available; under torchrun
    (LOCAL_RANK set) the rank's own GPU. A missing GPU asked for by name is an error naming the field."""
    check_device(name)
    import torch  # here, not at the top: the sampling configs (and so `rcm sample --help`) need no torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


MAX_STUDENT_STEPS = 4  # the reference's mid-times (1.5, 1.4, 1.0) cover 1..4 steps
DEFAULT_STUDENT_STEPS = 4


def check_steps(kind: str, steps: int, field: str = "steps") -> int:
    """``steps`` for a ``kind`` sampler: a student's 1..4, a teacher's 1..MAX_SAMPLING_STEPS; else a
    ConfigError naming ``field`` with that kind's range."""
    high = MAX_STUDENT_STEPS if kind == "student" else MAX_SAMPLING_STEPS
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= high:
        raise ConfigError(field, f"must be in 1..{high:,} for a {kind}, got {steps!r}")
    return steps


@dataclass
class SampleSettings:
    """The sampling settings every application shares."""

    kind: Literal["auto", "student", "teacher"] = "auto"
    """student (few-step consistency sampler) or teacher (UniPC/Euler + CFG); auto: from the file's metadata."""
    save_path: Path | None = None
    """where to write; the application says which formats (default samples.png / out.mp4)."""
    seed: int = 0
    """noise seed; sample i uses seed + i."""
    num_samples: int | None = None
    """how many samples (digits: default one per class or len(labels); Wan: default 1, out_0.mp4, ...)."""
    steps: int | None = None
    """this sampler's steps: a student's 1..4 (default 4), a teacher's 1..10,000 (default 50); a model card
    beside the checkpoint may set the default."""
    sigma_max: float | None = None
    """starting noise level σ_max; default the model card's, else the application's (student 80, teacher 5000)."""
    sampler: Literal["unipc", "euler"] | None = None
    """teacher sampler (flow UniPC, order 2, or Euler; default unipc); an error with a student."""
    guidance: float | None = None
    """teacher CFG weight (> 1 guides); default the application's (Wan 5, digits 2)."""
    shift: float | None = None
    """teacher schedule shift; default the application's (Wan 5, digits 1)."""
    fps: int | None = None
    """frames per second of a written video (default Wan 16, digits 8)."""
    threads: int = 0
    """CPU threads (torch.set_num_threads); 0: torch's default (digits: 1)."""

    TEACHER_ONLY = ("sampler", "guidance", "shift")  # a student has none of these

    def check(self, kind: str) -> None:
        """The settings that apply to ``kind`` (student / teacher), as ConfigErrors naming the field; a flag
        given that does not apply to ``kind`` is an error, never ignored. ``steps`` is checked against the
        kind's range (student 1..4, teacher 1..MAX_SAMPLING_STEPS); ``sampler`` gets its teacher default.
        Unset ``steps`` stays None (the pipeline fills it from the model card or the kind's default)."""
        if kind not in ("student", "teacher"):
            raise ConfigError("kind", f"must be student or teacher, got {kind!r}")
        check_seed("seed", self.seed)
        if self.num_samples is not None:
            check_count("num_samples", self.num_samples, 1, 2**31 - 1)
        if self.sigma_max is not None:
            check_number("sigma_max", self.sigma_max, 0, low_open=True)
        if self.fps is not None:
            check_count("fps", self.fps, 1, 1000)
            if self.save_path is not None and Path(self.save_path).suffix.lower() == ".gif" and self.fps > 50:
                # a GIF stores frame delays in 10 ms units, and browsers slow any delay under 20 ms to 100 ms
                raise ConfigError("fps", f"a GIF plays at most 50 frames per second, got {self.fps}; write an .mp4 "
                                         f"for more")
        if self.steps is not None:
            check_steps(kind, self.steps)
        if kind == "teacher":
            if self.guidance is not None:
                check_number("guidance", self.guidance, 0)
            if self.shift is not None:
                check_number("shift", self.shift, 0, low_open=True)
            self.sampler = self.sampler or "unipc"
            return
        for name in self.TEACHER_ONLY:
            if getattr(self, name) is not None:
                raise ConfigError(name, f"applies to a teacher; this checkpoint is a student, got --{name} "
                                        f"{getattr(self, name)}")

    def save_path_or(self, default: str, suffixes: tuple[str, ...], family: str) -> Path:
        path = Path(self.save_path) if self.save_path is not None else Path(default)
        if path.is_dir():
            raise ConfigError("save_path", f"{path} is a folder; give a file path")
        if path.suffix.lower() not in suffixes:
            raise ConfigError("save_path", f"must end in {', '.join(suffixes)} for {family}, got {path}")
        for parent in path.parents:  # checked now, not when the samples are written after the work
            if parent.exists():
                if not parent.is_dir():
                    raise ConfigError("save_path", f"{parent} is a file, not a folder (in {path})")
                break
        return path


@dataclass
class SampleResult:
    """What a sample command wrote, and how long it took (``dit_seconds_per_step``: mean over every network
    step of every sample; ``peak_memory_gb``: CUDA peak after text encoding, None on CPU)."""

    paths: list[Path]
    kind: str
    dit_seconds_per_step: float | None = None
    vae_decode_seconds: float | None = None
    peak_memory_gb: float | None = None
    text_encode_seconds: float | None = None
    extra: dict = field(default_factory=dict)


def existing_path(name: str, path: Path | None, required: bool = True) -> Path | None:
    """``path`` of field ``name``, which must exist (None is an error when ``required``)."""
    if path is None:
        if required:
            raise ConfigError(name, "is required for this model")
        return None
    path = Path(path)
    if not path.exists():
        raise PathArgumentError(name, f"no such file or folder: {path}")
    return path


def numbered(path: Path, i: int, n: int) -> Path:
    """``path`` for sample ``i`` of ``n``: itself when alone, else ``<stem>_<i><suffix>``."""
    return path if n == 1 else path.with_name(f"{path.stem}_{i}{path.suffix}")


def result_json(result: SampleResult) -> str:
    """The result as JSON (paths as strings), for scripts."""
    d = dict(result.__dict__)
    d["paths"] = [str(p) for p in result.paths]
    return json.dumps(d)


def read_model_card(weights: Path, field: str) -> dict | None:
    """The card beside ``weights`` (None: none); an invalid card is a ConfigError naming ``field`` and the
    card's file."""
    from rcm.checkpoint.card import read_card

    try:
        return read_card(weights)
    except ValueError as e:
        raise ConfigError(field, str(e)) from e


def card_sampling(kind: str, card: dict | None) -> dict:
    """The card's sampler settings when it is a card of a ``kind`` model, else {}."""
    if not card or card.get("kind", "student") != kind:
        return {}
    return card.get("sampling") or {}


def card_student_mid_times(card: dict | None, steps: int) -> tuple[float, ...] | None:
    """The mid-times the card of a student gives for a ``steps``-step sampler; None: none (the application's)."""
    from rcm.checkpoint.card import card_mid_times

    return card_mid_times({"sampling": card_sampling("student", card)}, steps)


def sampling_defaults(kind: str, card: dict | None, *, steps: int | None, sigma_max: float | None,
                      default_steps: int, default_sigma_max: float) -> tuple[int, float]:
    """(steps, sigma_max) for a ``kind`` sampler: the argument, else the card's (when it is a card of that
    kind), else the default; ``steps`` checked against the kind's range (a ConfigError naming ``steps``)."""
    sampling = card_sampling(kind, card)
    from_card = steps is None and "steps" in sampling
    if steps is None:
        steps = sampling.get("steps", default_steps)
    if sigma_max is None:
        try:
            sigma_max = check_number("sigma_max", float(sampling.get("sigma_max", default_sigma_max)), 0, low_open=True)
        except (ConfigError, TypeError, ValueError) as e:
            raise ConfigError("sigma_max", f"the model card's is not a number > 0 ({e}); fix the card or pass it") from e
    try:
        return check_steps(kind, steps), sigma_max
    except ConfigError as e:
        if not from_card:
            raise
        raise ConfigError("steps", f"{e.message} (the model card's default; fix the card or pass it)") from e
