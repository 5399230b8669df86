"""Every digits command's config, as plain dataclasses that import no torch: `rcm distill` (digits, digits-i2v),
`rcm sample`, `rcm eval`, `rcm study`, `rcm train-teacher`, `rcm train-i2v-teacher`, `rcm train-classifier`, and
the clip shape they share. A command's help builds these without torch; the checks that need it (a file's
contents, CUDA) import it when the command runs. Defaults come from ``presets``; the code of each command
lives in its own module (task.py, sample.py, evaluate.py, study.py, teacher.py, i2v.py, classifier.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import ClassVar, Literal

from rcm import (MAX_SAMPLING_STEPS, ConfigError, PathArgumentError, check_count, check_memory, check_number,
                 check_output_file, check_seed, check_threads)
from rcm.digits import presets
from rcm.losses.config import RCMConfig
from rcm.sample import Device, SampleSettings, config_devices
from rcm.train.config import DistillConfig, LoopConfig, OptimizerConfig

NUM_CLASSES = 10


DIGIT_SIZE = 8


@dataclass(frozen=True)
class ClipSpec:
    """Shape and motion of the clips."""

    frames: int = 8
    size: int = 16
    min_speed: float = 0.5  # pixels per frame
    max_speed: float = 1.5

    def __post_init__(self):
        check_count("size", self.size, DIGIT_SIZE, 2**16)  # the canvas holds a digit
        check_count("frames", self.frames, 1, 2**16)
        if not (0 <= self.min_speed <= self.max_speed and math.isfinite(self.max_speed)):
            raise ConfigError("min_speed", f"need 0 <= min_speed <= max_speed, got {self.min_speed}, {self.max_speed}")

    def batch_bytes(self, n: int) -> int:
        """Bytes of ``n`` float32 clips: the first big tensor of anything that draws a batch."""
        return 4 * n * math.prod(self.shape)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Per-clip shape ``(C, T, H, W)``."""
        return (1, self.frames, self.size, self.size)


DEMO_SPEC = ClipSpec(frames=8, size=16)


@dataclass
class EvalConfig:
    """How generators are evaluated (the same labels and noise seed for every generator)."""

    num_per_class: int = 50
    batch_size: int = 100
    seed: int = 0
    num_real: int = 1000  # held-out real clips (test split): the reference of frame FD, diversity, speed
    real_seed: int = 1234
    classifier: Path | None = None  # the frame classifier; None: the shipped one
    spec: ClipSpec = field(default_factory=ClipSpec)


@dataclass(frozen=True)
class DigitsReport:
    """What the final report samples and scores."""

    student_steps: tuple[int, ...] = presets.STUDENT_STEPS
    teacher_steps: tuple[int, ...] = (1, 2, 4, presets.TEACHER_STEPS)
    num_per_class: int = 20  # clips per class scored for each generator
    num_real: int = 500  # held-out real clips: the reference of frame FD, diversity and speed
    sigma_max: float = presets.STUDENT_SIGMA_MAX
    mid_times: tuple[float, ...] | None = None
    """students' TrigFlow mid-times, the first steps−1 used at each step count; None: the digits presets' per
    step count (presets.STUDENT_MID_TIMES); 1.5 1.4 1.0 is the reference's (Wan) choice."""
    seed: int = 0

    def __post_init__(self):  # checked when the command starts, not after training
        check_count("num_per_class", self.num_per_class, 2)  # diversity compares two or more clips of a digit
        check_count("num_real", self.num_real, 20)
        for name, n in (("num_per_class", self.num_per_class * NUM_CLASSES), ("num_real", self.num_real)):
            check_memory(name, DEMO_SPEC.batch_bytes(n), f"{n:,} scored clips")  # each generator's, held at once
        if not self.student_steps and not self.teacher_steps:  # one may be empty: a teacher-only report, say
            raise ConfigError("teacher_steps", "must name at least one step count (or give --student-steps)")
        for name in ("student_steps", "teacher_steps"):
            for n in getattr(self, name):
                check_count(name, n, 1, MAX_SAMPLING_STEPS)
        check_number("sigma_max", self.sigma_max, 0, low_open=True)
        if self.mid_times is not None and any(not (math.isfinite(t) and 0 < t < math.pi / 2) for t in self.mid_times):
            raise ConfigError("mid_times", f"must be TrigFlow times in (0, π/2), got {list(self.mid_times)}")
        check_seed("seed", self.seed)
        for steps in self.student_steps:
            if self.mid_times is None and steps not in presets.STUDENT_MID_TIMES:
                raise ConfigError("student_steps", f"the digits presets have mid-times for "
                                  f"{sorted(presets.STUDENT_MID_TIMES)} steps, got {steps}; pass --report-settings.mid-times")
            if self.mid_times is not None and len(self.mid_times) < steps - 1:
                raise ConfigError("mid_times", f"{steps} steps need {steps - 1} mid-times, got {list(self.mid_times)}")

    def student_mid_times(self, steps: int) -> tuple[float, ...]:
        """The mid-times a ``steps``-step student is sampled with: the first steps−1 of ``mid_times``, else the
        digits presets'."""
        return tuple(self.mid_times[: steps - 1]) if self.mid_times is not None else presets.student_mid_times(steps)


@dataclass
class EvalRunsConfig:
    """Score the teacher and the students of finished `rcm distill` runs (or student files) side by side.

    The comparison table of the README: `rcm distill --method scm; rcm distill --method dmd2; rcm distill;
    rcm eval` (each run resumes if it already exists).
    """

    runs: tuple[Path, ...] = (Path("runs/digits-scm"), Path("runs/digits-dmd2"), Path("runs/digits-rcm"))
    """the students: finished `rcm distill` run folders (their student_ema.safetensors, named by the run's method)
    or digits student .safetensors files, e.g. from `rcm export` (named by the method in their metadata, else by
    the file's name without .safetensors)."""
    teacher: Path | None = None  # None: the shipped teacher
    out_dir: Path = Path("runs/eval")
    guidance: float = presets.TEACHER_GUIDANCE  # the teacher's CFG weight, as the demo distills with
    report_settings: DigitsReport = field(default_factory=DigitsReport)
    reuse_teacher_rows: bool = False
    """False: sample the teacher afresh (and refresh the user cache of teacher rows)."""
    device: Device = "auto"
    """auto: cuda when available, else cpu."""
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default)."""

    def __post_init__(self):
        check_threads("threads", self.threads)  # the students' files: when the command starts (eval_runs)
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise PathArgumentError("teacher", f"no file at {self.teacher}")
        check_number("guidance", self.guidance, 0)
        config_devices(self.device)


@dataclass
class DigitsDistillConfig(DistillConfig):
    """Distill the shipped digits teacher into a 1-4 step student with rCM (or sCM / DMD2 alone).

    With no arguments: rCM (on CUDA when available, else the CPU), writing samples, metrics.json and the
    per-frame table to --out-dir. Re-running the same command resumes from the last checkpoint."""

    teacher: Path | None = None
    """the teacher; default the shipped one (rcm/assets/digits_teacher.safetensors)."""
    batch_size: int = presets.BATCH_SIZE
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(iterations=presets.ITERATIONS,
                                                                checkpoint_every=presets.CHECKPOINT_EVERY))
    loss: RCMConfig = field(default_factory=lambda: presets.LOSS)
    student_optim: OptimizerConfig = field(default_factory=lambda: presets.OPTIMIZER)
    critic_optim: OptimizerConfig = field(default_factory=lambda: presets.OPTIMIZER)
    ema_sigma_rel: float = presets.EMA_SIGMA_REL
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default); one is fastest for this small model."""
    report: bool = True
    """sample and score teacher and student at the end."""
    report_settings: DigitsReport = field(default_factory=DigitsReport)
    device: Device = "auto"
    """auto: cuda when available, else cpu (clips are made on the CPU; batches move to the device)."""
    model: Literal["digits"] = "digits"

    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = (*DistillConfig.NOT_FINGERPRINTED, "report", "report_settings",
                                                    "device")

    def __post_init__(self):
        super().__post_init__()
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise ConfigError("teacher", f"no file at {self.teacher}")
        for where in config_devices(self.device):  # clips are made on the CPU, then moved
            check_memory("batch_size", DEMO_SPEC.batch_bytes(self.batch_size), f"a batch of {self.batch_size:,} clips",
                         where)


@dataclass
class FinetuneI2VConfig:
    """Fine-tune the shipped digits teacher into the image-to-video teacher (first frame given)."""

    teacher: Path | None = None
    """the T2V teacher to start from; default the shipped one."""
    out: Path = Path("runs/digits_i2v_teacher.safetensors")
    """where to write the I2V teacher (the shipped copy: rcm/assets/digits_i2v_teacher.safetensors; never
    written by default: the package may be read-only)."""
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-4
    label_dropout: float = 0.1
    """the probability of the null label (keeps classifier-free guidance working)."""
    seed: int = 0
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default)."""

    def __post_init__(self):
        check_count("steps", self.steps, 1)
        check_count("batch_size", self.batch_size, 1, 2**31 - 1)
        check_memory("batch_size", DEMO_SPEC.batch_bytes(self.batch_size), f"a batch of {self.batch_size:,} clips")
        check_number("lr", self.lr, 0, low_open=True)
        check_number("label_dropout", self.label_dropout, 0, 1, high_open=True)
        check_seed("seed", self.seed)
        check_threads("threads", self.threads)
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise PathArgumentError("teacher", f"no file at {self.teacher}")
        check_output_file("out", self.out)


@dataclass(frozen=True)
class I2VReport:
    """What the I2V report samples and scores: held-out clips whose first frame is given."""

    num_clips: int = 100
    teacher_steps: int = 16
    student_steps: tuple[int, ...] = (1, 2, 4)
    sigma_max: float = 80.0
    seed: int = 0
    num_real: int = 1000
    """held-out real clips of the per-frame metrics' reference (``rcm.digits.metrics.real_reference``)."""
    real_seed: int = 1234

    def __post_init__(self):  # checked when the command starts, not after training
        if self.num_clips < 20:  # class-balanced: two clips of each digit at least
            raise ConfigError("num_clips", f"must be >= 20 (the per-frame diversity compares two clips of a digit), "
                                           f"got {self.num_clips}")
        if self.num_real < 20:
            raise ConfigError("num_real", f"must be >= 20, got {self.num_real}")
        check_count("num_clips", self.num_clips, 1, 2**31 - 1)
        check_memory("num_clips", DEMO_SPEC.batch_bytes(self.num_clips), f"{self.num_clips:,} scored clips")
        check_count("teacher_steps", self.teacher_steps, 1, MAX_SAMPLING_STEPS)
        if not self.student_steps or any(not 1 <= n <= 4 for n in self.student_steps):
            raise ConfigError("student_steps", f"must be step counts in 1..4, got {list(self.student_steps)}")
        check_number("sigma_max", self.sigma_max, 0, low_open=True)
        check_seed("seed", self.seed)


@dataclass
class DigitsI2VDistillConfig(DigitsDistillConfig):
    """Distill the image-to-video digits teacher (first frame given) with rCM (or sCM / DMD2 alone).

    ``--experts two``: a two-expert teacher, the I2V teacher twice switched at ``--boundary``, distilled into
    one student per expert (each initialised from its expert; the rollout crosses from one to the other)."""

    teacher: Path | None = None
    """the I2V teacher; default the shipped one (rcm/assets/digits_i2v_teacher.safetensors)."""
    experts: Literal["one", "two"] = "one"
    boundary: float = presets.I2V_BOUNDARY
    """RF time of the experts' switch (--experts two)."""
    i2v_report: I2VReport = field(default_factory=I2VReport)
    model: Literal["digits-i2v"] = "digits-i2v"

    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = (*DigitsDistillConfig.NOT_FINGERPRINTED, "i2v_report")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.boundary < 1.0:
            raise ConfigError("boundary", f"must be an RF time in (0, 1), got {self.boundary}")


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


METHODS = ("rcm", "dmd2", "scm")  # the study's methods


@dataclass
class StudyConfig:
    """Distill the digits teacher with each method at equal budgets and score each one's EMA student at
    1/2/4 steps at several iterations; write a table (markdown + json) and a plot."""

    out_dir: Path = Path("runs/study")
    methods: tuple[str, ...] = METHODS
    snapshots: tuple[int, ...] = (500, 1000, 2000, 3000, 5000, 7500, 10000)
    """iterations at which each method's EMA student is scored; the last one is the run's length."""
    batch_size: int = 64
    lr: float = 1e-4
    """learning rate of student and critic (the same for every method)."""
    student_steps: tuple[int, ...] = presets.STUDENT_STEPS
    teacher_steps: tuple[int, ...] = (4, presets.TEACHER_STEPS)
    """teacher rows of the table and dashed levels of the plot."""
    num_per_class: int = 20
    num_real: int = 500
    seed: int = 0
    """the report seed: noise of every scored sample."""
    checkpoint_every: int = 500
    device: Device = "auto"
    concurrent: bool = False
    """run the methods as concurrent processes (on one GPU: the small model leaves it mostly idle)."""
    threads: int = presets.THREADS
    """CPU threads per process (torch.set_num_threads; 0: torch's default)."""
    loss: RCMConfig = field(default_factory=lambda: presets.LOSS)
    """loss settings shared by every method (each method then drops the term it lacks: sCM has no DMD term,
    DMD2 no sCM term); e.g. --loss.dmd.loss-scale, --loss.student-update-freq."""
    ema_sigma_rel: float = presets.EMA_SIGMA_REL

    def __post_init__(self):
        if not self.methods or any(m not in METHODS for m in self.methods) or len(set(self.methods)) != len(self.methods):
            raise ConfigError("methods", f"must be distinct names among {', '.join(METHODS)}, got {list(self.methods)}")
        if not self.snapshots or any(s < 1 for s in self.snapshots) or list(self.snapshots) != sorted(set(self.snapshots)):
            raise ConfigError("snapshots", f"must be increasing iterations >= 1, got {list(self.snapshots)}")
        for steps in self.student_steps:
            if steps not in presets.STUDENT_MID_TIMES:
                raise ConfigError("student_steps", f"the digits presets have mid-times for "
                                  f"{sorted(presets.STUDENT_MID_TIMES)} steps, got {steps}")
        check_count("snapshots", self.snapshots[-1], 1)
        for name in ("batch_size", "checkpoint_every"):
            check_count(name, getattr(self, name), 1, 2**31 - 1)
        check_count("num_per_class", self.num_per_class, 2, 2**31 - 1)  # the diversity compares two clips of a digit
        check_count("num_real", self.num_real, 20)
        for n in self.teacher_steps:
            check_count("teacher_steps", n, 1, MAX_SAMPLING_STEPS)
        check_number("lr", self.lr, 0, low_open=True)
        check_seed("seed", self.seed)
        check_threads("threads", self.threads)
        for where in config_devices(self.device):  # clips are made on the CPU, then moved
            check_memory("batch_size", DEMO_SPEC.batch_bytes(self.batch_size), f"a batch of {self.batch_size:,} clips",
                         where)
        for name, n in (("num_per_class", self.num_per_class * 10), ("num_real", self.num_real)):
            check_memory(name, DEMO_SPEC.batch_bytes(n), f"{n:,} scored clips")
        self.distill_config(self.methods[0])  # the shared run settings (loss, EMA) are checked now, not after a run

    def distill_config(self, method: str) -> DigitsDistillConfig:
        """The method's run: the digits defaults with the study's budget and settings, no final report."""
        optim = replace(presets.OPTIMIZER, lr=self.lr)
        every = reduce(math.gcd, self.snapshots)
        return DigitsDistillConfig(
            method=method, out_dir=Path(self.out_dir) / method, batch_size=self.batch_size,
            loop=LoopConfig(iterations=self.snapshots[-1], checkpoint_every=min(self.checkpoint_every, every)),
            student_optim=optim, critic_optim=replace(optim), report=False, sample_every=every,
            device=self.device, threads=self.threads, loss=self.loss, ema_sigma_rel=self.ema_sigma_rel)

    def eval_config(self) -> EvalConfig:
        return EvalConfig(num_per_class=self.num_per_class, num_real=self.num_real, seed=self.seed, spec=DEMO_SPEC)


@dataclass
class TrainTeacherConfig:
    """Recipe of the shipped teacher (rectified flow, label dropout for CFG, EMA)."""

    out_dir: Path = Path("runs/teacher")
    export: Path | None = None  # where the final EMA weights go; None: out_dir/teacher.safetensors
    model: str = "digits-dit"
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    min_lr_ratio: float = 0.05  # cosine decay to lr·min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    rho_mean: float = 0.0  # logit-normal ρ: sigmoid(N(rho_mean, rho_std²))
    rho_std: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    resume: bool = True
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default)."""
    device: Device = "auto"
    """auto: cuda when available, else cpu (clips are made on the CPU; batches move to the device)."""
    spec: ClipSpec = field(default_factory=lambda: DEMO_SPEC)

    def __post_init__(self):  # every setting, before a folder is made or a network built (the model name: train_teacher)
        check_count("steps", self.steps, 0)
        check_count("warmup", self.warmup, 0)
        for name in ("batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_count(name, getattr(self, name), 1, 2**31 - 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        check_number("grad_clip", self.grad_clip, 0, low_open=True)
        check_number("ema_decay", self.ema_decay, 0, 1, high_open=True)
        check_number("label_dropout", self.label_dropout, 0, 1, high_open=True)
        check_number("rho_mean", self.rho_mean)
        check_number("rho_std", self.rho_std, 0, low_open=True)
        check_seed("seed", self.seed)
        check_threads("threads", self.threads)
        if self.export is not None:
            check_output_file("export", self.export)
        for where in config_devices(self.device):  # clips are made on the CPU, then moved
            check_memory("batch_size", self.spec.batch_bytes(self.batch_size), f"a batch of {self.batch_size:,} clips",
                         where)


@dataclass
class TrainClassifierConfig:
    """Recipe of the shipped evaluator classifier."""

    out: Path = Path("runs/classifier.safetensors")  # the shipped copy: rcm/assets/digits_classifier.safetensors
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    width: int = 32
    feature_dim: int = 64
    spec: ClipSpec = field(default_factory=ClipSpec)
    num_test: int = 1000  # held-out clips for the accuracy reported at the end
    log_every: int = 100
    threads: int = presets.THREADS
    """CPU threads (torch.set_num_threads; 0: torch's default)."""

    def __post_init__(self):
        check_count("steps", self.steps, 1)
        for name in ("batch_size", "width", "feature_dim", "num_test", "log_every"):
            check_count(name, getattr(self, name), 1, 2**31 - 1)
        for name, n in (("batch_size", self.batch_size), ("num_test", self.num_test)):
            check_memory(name, self.spec.batch_bytes(n), f"{n:,} clips")
        check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_seed("seed", self.seed)
        check_output_file("out", self.out)
        check_threads("threads", self.threads)
