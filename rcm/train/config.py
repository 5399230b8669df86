"""What a training run is given, as plain dataclasses: the loop, the optimizers, the method, the log sinks, and
``DistillConfig``, which every application's config extends. Nothing here imports torch: a command's help
builds these (and the applications' configs that extend them) without it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from rcm import MAX_ITERATIONS, ConfigError, check_count, check_seed, check_threads
from rcm.losses.config import RCMConfig
from rcm.parallel.config import ParallelConfig

Method = Literal["rcm", "scm", "dmd2"]

def method_config(method: Method, base: RCMConfig) -> RCMConfig:
    """The loss settings of a method: rCM as given; sCM without the DMD term; DMD2 without the sCM term."""
    if method == "rcm":
        return base
    if method == "scm":
        return dataclasses.replace(base, dmd=dataclasses.replace(base.dmd, loss_scale=0.0))
    if method == "dmd2":
        scm = dataclasses.replace(base.scm, loss_scale=0.0, tangent_warmup=0)
        return dataclasses.replace(base, scm=scm)
    raise ConfigError("method", f"must be one of rcm, scm, dmd2; got {method!r}")


LogSink = Literal["jsonl", "tensorboard", "wandb"]
DEFAULT_SINKS: tuple[LogSink, ...] = ("jsonl", "tensorboard")
SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the package it needs


def check_sinks(field: str, sinks: tuple[str, ...]) -> None:
    """A ``ConfigError`` on ``field`` for an unknown or repeated sink."""
    for sink in sinks:
        if sink not in ("jsonl", *SINK_PACKAGES):
            raise ConfigError(field, f"unknown log sink {sink!r}; choose from jsonl, {', '.join(SINK_PACKAGES)}")
    if len(set(sinks)) != len(sinks):
        raise ConfigError(field, f"names a sink twice: {' '.join(sinks)}")


@dataclass
class LoopConfig:
    """How long to train and how often to save."""

    iterations: int = 400
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite_steps: int = 5
    seed: int = 0

    def __post_init__(self):
        for name, low in (("iterations", 0), ("checkpoint_every", 1), ("keep_checkpoints", 1), ("log_every", 1),
                          ("max_nonfinite_steps", 1)):
            check_count(name, getattr(self, name), low, MAX_ITERATIONS)
        check_seed("seed", self.seed)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with a linear learning-rate warmup (the reference: factor 1e-6 → 1 over `warmup` steps of
    this optimizer, then constant)."""

    lr: float = 2e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup: int = 100

    def __post_init__(self):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive number, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must lie in [0, 1), got {self.betas}")
        for name, ok in (("weight_decay", self.weight_decay >= 0), ("eps", self.eps > 0), ("warmup", self.warmup >= 0)):
            if not ok:
                raise ConfigError(name, f"must be {'> 0' if name == 'eps' else '>= 0'}, got {getattr(self, name)}")


@dataclass
class DistillConfig:
    """What every distillation run is given; an application's config extends it (with its presets)."""

    method: Method = "rcm"
    """rcm, or scm / dmd2 alone (for comparison)."""
    out_dir: Path | None = None
    """run folder; default runs/<model>-<method>."""
    resume: bool = True
    """continue from out_dir's latest checkpoint if there is one."""
    batch_size: int = 1
    """samples per data-parallel rank and iteration."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    loss: RCMConfig = field(default_factory=RCMConfig)
    student_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    critic_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    ema_sigma_rel: float = 0.1
    """σ_rel of the power-function EMA (the exported student)."""
    sample_every: int = 0
    """write EMA-student samples every this many iterations (and at the end); 0: only at the end."""
    threads: int = 0
    """torch.set_num_threads; 0 keeps torch's default."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """used when launched by torchrun."""
    log: tuple[LogSink, ...] = DEFAULT_SINKS
    """where the logs go (rank 0): jsonl (log.jsonl, and log.png at the end), tensorboard (<run>/tensorboard),
    wandb (<run>/wandb, offline unless WANDB_MODE is set; needs the wandb package)."""

    # Settings that do not change a run's trajectory (its length, outputs, reporting, layout): a run
    # resumes across changes of these. Of `loop`, only the seed is part of the fingerprint.
    NOT_FINGERPRINTED: ClassVar[tuple[str, ...]] = ("out_dir", "resume", "threads", "parallel", "sample_every",
                                                      "log")

    @property
    def model(self) -> str:  # each application's config sets it as a field (its run folder's name: runs/<model>-<method>)
        raise NotImplementedError(f"{type(self).__name__} names no model: use an application's config "
                                  f"(DigitsDistillConfig, WanDistillConfig), which extends DistillConfig")

    def __post_init__(self):
        check_count("batch_size", self.batch_size, 1, 2**31 - 1)  # an application checks it against memory
        if not (self.ema_sigma_rel > 0 and math.isfinite(self.ema_sigma_rel)):
            raise ConfigError("ema_sigma_rel", f"must be > 0, got {self.ema_sigma_rel}")
        check_count("sample_every", self.sample_every, 0)
        check_threads("threads", self.threads)
        check_sinks("log", self.log)
        method_config(self.method, self.loss)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path("runs") / f"{self.model}-{self.method}"

    def fingerprint(self) -> dict:
        """Everything that changes the trajectory, flat (dotted field names), as a resumed run must match it:
        files (the teacher) by their content digest, not their spelling; the effective CPU thread count,
        since a different count changes float sums (and so the trajectory) on the CPU."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_FINGERPRINTED}
        fields["loop"] = {"seed": self.loop.seed}
        import torch

        from rcm.checkpoint.fingerprint import settings_record

        fields["threads"] = torch.get_num_threads()
        return settings_record(fields)
