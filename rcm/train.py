"""The distillation loop: sCM, DMD2 or rCM over any task (a teacher, its data and its evaluation).

One iteration is a student or a critic iteration (RCM_METHOD.md §3.1). A student iteration backpropagates
each loss term as it is produced (the sCM graph is freed before the DMD rollout), then takes one optimizer
step and updates the power-function EMA; a critic iteration trains the fake score. Everything a resumed
run needs (models, optimizers, schedulers, EMA, counters, every RNG state, the data position) is in the
checkpoint, so a run killed at any point and resumed continues exactly as if never stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union

import torch
from torch import Tensor, nn

from rcm.checkpoint import atomic_write_bytes, load_latest, save_checkpoint
from rcm.parallel import ParallelConfig, gathered_first_term, grads_finite
from rcm.demo import TeacherSampling
from rcm.tasks import DigitsReport
from rcm.timing import phase
from rcm.losses import (
    DMDConfig,
    RCMConfig,
    SCMConfig,
    critic_loss,
    ema_update_,
    scm_jvp,
    power_ema_beta,
    power_ema_gamma,
    rcm_phase,
    student_iteration_count,
    student_losses,
)

Method = Literal["rcm", "scm", "dmd2"]


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
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.eps <= 0 or self.warmup < 0:
            raise ValueError(f"need weight_decay >= 0, eps > 0, warmup >= 0; got {self}")


def method_config(method: Method, base: RCMConfig) -> RCMConfig:
    """The loss settings of a method: rCM as given; sCM without the DMD term; DMD2 without the sCM term."""
    if method == "rcm":
        return base
    if method == "scm":
        return dataclasses.replace(base, dmd=dataclasses.replace(base.dmd, loss_scale=0.0))
    if method == "dmd2":
        scm = dataclasses.replace(base.scm, loss_scale=0.0, tangent_warmup=0)
        return dataclasses.replace(base, scm=scm)
    raise ValueError(f"method must be one of rcm, scm, dmd2; got {method!r}")


class Task(Protocol):
    """What the loop needs from a model family (the digits demo, Wan2.1)."""

    def build_teacher(self) -> nn.Module: ...

    def next_batch(self) -> tuple[Tensor, Any]:
        """(x0 [B, C, T, H, W], context) for one iteration."""

    def negative_context(self, context: Any) -> Any:
        """The CFG negative (null label / negative prompt) matching `context`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW stepping fp32 master copies of low-precision (bf16) model parameters.

    The networks compute and take gradients in bf16; ``step`` moves the gradients onto the fp32 masters,
    updates them, and copies them back into the model. The masters travel in ``state_dict``, so a
    resumed run continues from the exact fp32 values (the reference's FusedAdam with master weights)."""

    def __init__(self, params, **kwargs):
        self.model_params = [p for p in params]
        masters = [p.detach().to(torch.float32, copy=True).requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **kwargs)

    def _masters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure")
        for p, m in zip(self.model_params, self._masters()):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        super().step()
        for p, m in zip(self.model_params, self._masters()):
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": [m.detach().clone() for m in self._masters()]}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_weights")
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for p, m, saved in zip(self.model_params, self._masters(), masters, strict=True):
                m.copy_(saved)
                p.copy_(saved)


@dataclass
class TrainState:
    """The models and optimizers of a run; `iteration` is the next iteration to run.

    compile: a ``torch.compile`` backend ("inductor") to run the networks and the sCM JVP pass with (see
    ``networks``); None runs them eagerly."""

    student: nn.Module
    teacher: nn.Module
    fake_score: nn.Module | None
    ema: nn.Module
    student_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None
    student_scheduler: torch.optim.lr_scheduler.LRScheduler
    critic_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    iteration: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    compile: str | None = None
    _compiled: bool = field(default=False, repr=False)

    def networks(self) -> tuple[Any, Any, Any, Any]:
        """(student, teacher, fake score, the student's sCM JVP pass ``(x_t, t, context, F_teacher) ->
        c s dF/dt``) as the losses call them. With ``compile``, every DiT block is compiled first
        (``rcm.parallel.compile_blocks``: one block graph per variant, shared by all layers and networks);
        the JVP pass is ``torch.func.jvp`` around the compiled blocks."""
        if self.compile and not self._compiled:
            from rcm.parallel import compile_blocks

            for module in (self.student, self.teacher, self.fake_score):
                if module is not None:
                    compile_blocks(module, self.compile)
            self._compiled = True
        return self.student, self.teacher, self.fake_score, functools.partial(scm_jvp, self.student)


def _optimizer(params, cfg: OptimizerConfig):
    params = list(params)
    cls = torch.optim.AdamW if all(p.dtype == torch.float32 for p in params) else MasterWeightAdamW
    fused = all(p.is_cuda for p in params)  # one kernel for the whole update on GPU
    opt = cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=fused or None)
    start = 1e-6
    ramp = (lambda n: start + (1 - start) * min(1.0, n / cfg.warmup)) if cfg.warmup > 0 else (lambda n: 1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, ramp)


def init_state(teacher: nn.Module, loss: RCMConfig, student_optim: OptimizerConfig, critic_optim: OptimizerConfig,
               seed: int, device: torch.device, dtype: torch.dtype | None = None,
               compile: str | None = None) -> TrainState:
    """Student, fake score and EMA start as copies of the teacher, which is frozen.

    dtype: the networks' compute dtype (default: the teacher's). With bf16 the teacher, student and fake
    score are bf16 modules and their optimizers step fp32 master weights (``MasterWeightAdamW``); the EMA
    is always fp32. (Under FSDP2, keep fp32 here: its mixed-precision policy computes in bf16.)

    A teacher on the meta device gives a state of meta modules (no memory), to shard and then fill with
    ``rcm.parallel.materialize_train_state``; ``device`` is then only the generator's."""
    on_meta = any(p.is_meta for p in teacher.parameters())
    teacher = (teacher.to(dtype=dtype) if on_meta else teacher.to(device=device, dtype=dtype)).requires_grad_(False).eval()
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = copy.deepcopy(teacher).float()
    fake = copy.deepcopy(teacher).requires_grad_(True).train() if loss.dmd_enabled else None
    s_opt, s_sched = _optimizer(student.parameters(), student_optim)
    c_opt, c_sched = _optimizer(fake.parameters(), critic_optim) if fake is not None else (None, None)
    generator = torch.Generator(device=device).manual_seed(seed)
    return TrainState(student, teacher, fake, ema, s_opt, c_opt, s_sched, c_sched, generator, compile=compile)


def state_dict(state: TrainState) -> dict:
    opt = lambda o: None if o is None else o.state_dict()  # noqa: E731
    return {
        "iteration": state.iteration,
        "nonfinite_in_a_row": state.nonfinite_in_a_row,
        "skipped_steps": state.skipped_steps,
        "student": state.student.state_dict(),
        "ema": state.ema.state_dict(),
        "fake_score": None if state.fake_score is None else state.fake_score.state_dict(),
        "student_optimizer": state.student_optimizer.state_dict(),
        "critic_optimizer": opt(state.critic_optimizer),
        "student_scheduler": state.student_scheduler.state_dict(),
        "critic_scheduler": opt(state.critic_scheduler),
        "generator": state.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def load_state_dict(state: TrainState, saved: dict) -> None:
    state.iteration = saved["iteration"]
    state.nonfinite_in_a_row = saved["nonfinite_in_a_row"]
    state.skipped_steps = saved["skipped_steps"]
    state.student.load_state_dict(saved["student"])
    state.ema.load_state_dict(saved["ema"])
    if state.fake_score is not None:
        state.fake_score.load_state_dict(saved["fake_score"])
        state.critic_optimizer.load_state_dict(saved["critic_optimizer"])
        state.critic_scheduler.load_state_dict(saved["critic_scheduler"])
    state.student_optimizer.load_state_dict(saved["student_optimizer"])
    state.student_scheduler.load_state_dict(saved["student_scheduler"])
    state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])


def _on_every_rank(flag: bool) -> bool:
    """`flag` and-ed over all ranks (so every rank skips or steps together); itself without a process group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor(int(flag), device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


def train_step(state: TrainState, task: Task, loss: RCMConfig, ema_gamma: float, max_nonfinite: int) -> dict:
    """Run iteration `state.iteration` and advance it. Returns the logged scalars."""
    k = state.iteration
    kind = rcm_phase(k, loss)  # "student" or "critic"
    x0, context = task.next_batch()
    negative = task.negative_context(context)
    logs: dict[str, Any] = {"iteration": k, "phase": kind}
    finite = True
    student, teacher, fake_score, jvp = state.networks()
    if kind == "student":
        module, optimizer, scheduler = state.student, state.student_optimizer, state.student_scheduler
        optimizer.zero_grad(set_to_none=True)
        # gathered_first_term: the sCM JVP pass runs on pre-gathered FSDP parameters (a no-op unsharded).
        terms = gathered_first_term(student_losses(student, teacher, fake_score, x0, context, negative, iteration=k,
                                                   config=loss, generator=state.generator, jvp=jvp),
                                    state.student)
        for name, per_sample, diagnostics in terms:
            total = per_sample.sum()
            logs[f"loss_{name}"] = total.item()
            logs.update({f"{name}_{key}": _scalar(v) for key, v in diagnostics.items()})
            # A term whose every sample was zeroed by the per-sample guard carries no signal: the step is
            # non-finite as a whole (stepping would only apply weight decay and age Adam's moments).
            if not torch.isfinite(total) or int(diagnostics.get("nonfinite", 0)) == per_sample.shape[0]:
                finite = False
            if total.requires_grad:  # backward even when non-finite: sharded ranks must all join it
                with phase(f"{name}.backward"):
                    total.backward()
    else:
        module, optimizer, scheduler = state.fake_score, state.critic_optimizer, state.critic_scheduler
        optimizer.zero_grad(set_to_none=True)
        per_sample, diagnostics = critic_loss(student, fake_score, x0, context, iteration=k, config=loss,
                                              generator=state.generator)
        total = per_sample.sum()
        logs["loss_critic"] = total.item()
        logs.update({f"critic_{key}": _scalar(v) for key, v in diagnostics.items()})
        finite = bool(torch.isfinite(total))
        with phase("critic.backward"):
            total.backward()

    finite = _on_every_rank(finite) and grads_finite(module)
    if finite:
        with phase("optimizer"):
            optimizer.step()
            scheduler.step()
        state.nonfinite_in_a_row = 0
        if kind == "student":
            n = student_iteration_count(k, loss.scm.tangent_warmup, loss.student_update_freq)
            with phase("ema"):
                ema_update_(state.ema, state.student, power_ema_beta(n, ema_gamma))
    else:
        state.nonfinite_in_a_row += 1
        state.skipped_steps += 1
        logs["skipped"] = True
        if state.nonfinite_in_a_row >= max_nonfinite:
            raise NonFiniteError(
                f"{state.nonfinite_in_a_row} consecutive {kind} steps had non-finite losses or gradients "
                f"(last at iteration {k}); stopping. The last good checkpoint is kept.")
    optimizer.zero_grad(set_to_none=True)
    state.iteration = k + 1
    return logs


def _scalar(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().double().mean().item() if v.numel() else 0.0
    return v


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
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _truncate_log(log_path: Path, iteration: int) -> None:
    """Keep the log lines of iterations before `iteration`: a run killed after its last checkpoint logged
    iterations that the resumed run repeats (and maybe a torn last line)."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["iteration"] < iteration:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by the kill
    atomic_write_bytes(log_path, "".join(kept).encode())


def run_loop(state: TrainState, task: Task, loss: RCMConfig, loop: LoopConfig, run_dir: Path,
             config_record: dict, progress=None, stop_after: int | None = None, mesh=None) -> TrainState:
    """Train from `state.iteration` to `loop.iterations`, checkpointing into `run_dir/checkpoints`.

    `stop_after`: return after this many iterations (tests of interruption); the loop itself is resumable
    from any checkpoint. Logs go to `run_dir/log.jsonl` (one JSON object per logged iteration, rank 0).
    `mesh`: a `rcm.parallel.ParallelMesh` for a sharded run (checkpoints then go through DCP, collectively).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    gamma = power_ema_gamma(config_record.get("ema_sigma_rel", 0.1))
    log_path = run_dir / "log.jsonl"
    rank0 = _is_rank0()
    if rank0:
        _truncate_log(log_path, state.iteration)
    done = 0
    start = time.perf_counter()

    def save():
        extra = {"task": task.state_dict(), "config": config_record}
        if mesh is not None:
            from rcm.parallel import save_sharded_checkpoint

            save_sharded_checkpoint(ckpt_dir, state, mesh, extra=extra, keep=loop.keep_checkpoints)
        else:
            save_checkpoint(ckpt_dir, state.iteration, {"train": state_dict(state), **extra}, keep=loop.keep_checkpoints)

    while state.iteration < loop.iterations:
        logs = train_step(state, task, loss, gamma, loop.max_nonfinite_steps)
        done += 1
        if progress is not None and rank0:
            progress(state.iteration, loop.iterations, logs)
        if rank0 and (logs["iteration"] % loop.log_every == 0 or logs.get("skipped")):
            logs["seconds"] = round(time.perf_counter() - start, 3)
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
        if state.iteration % loop.checkpoint_every == 0 or state.iteration == loop.iterations:
            save()
        if stop_after is not None and done >= stop_after:
            break
    return state


def resume_if_possible(state: TrainState, task: Task, run_dir: Path, config_record: dict, mesh=None) -> bool:
    """Load the newest good checkpoint of `run_dir` into `state` and `task`; False if there is none."""
    if mesh is not None:
        from rcm.parallel import load_latest_sharded_checkpoint

        found = load_latest_sharded_checkpoint(run_dir / "checkpoints", state, mesh)
        if found is None:
            return False
        extra, path = found
        saved = {"config": extra["config"], "task": extra["task"], "train": None}
    else:
        found = load_latest(run_dir / "checkpoints")
        if found is None:
            return False
        saved, path = found
    if saved.get("config", {}).get("fingerprint") != config_record.get("fingerprint"):
        raise ValueError(
            f"{path} was written by a run with different settings; use another --out-dir or --no-resume.\n"
            f"  saved: {saved.get('config', {}).get('fingerprint')}\n  now:   {config_record.get('fingerprint')}")
    if saved["train"] is not None:
        load_state_dict(state, saved["train"])
    task.load_state_dict(saved["task"])
    return True


# ----------------------------------------------------------------------------------------------------------
# `rcm distill wan2.1-t2v-1.3b | wan2.1-t2v-14b | wan`: Wan2.1 T2V on an `rcm synth` dataset.

try:  # tyro markers for the CLI; the library works without tyro (e.g. on a GPU image that lacks it)
    import tyro

    _Fixed = tyro.conf.Fixed
    _OmitPrefixes = tyro.conf.OmitSubcommandPrefixes

    def _subcommand(name: str, default: Any, description: str) -> Any:
        return tyro.conf.subcommand(name, default=default, description=description, prefix_name=False)
except ImportError:  # pragma: no cover
    class _Fixed:  # noqa: D101
        def __class_getitem__(cls, item):
            return item

    _OmitPrefixes = _Fixed

    def _subcommand(name: str, default: Any, description: str) -> Any:
        return None

WanModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan"]


@dataclass
class WanDistillConfig:
    """rCM distillation of a Wan2.1 T2V teacher on a latent dataset (`rcm synth`). Defaults: the reference's
    recipe for this size (RCM_METHOD.md §5.1). bf16 compute with fp32 master weights on CUDA, fp32 on the
    CPU; under torchrun FSDP2 (+ CP, activation checkpointing: --parallel.*). Re-running resumes."""

    model: _Fixed[WanModel] = "wan2.1-t2v-1.3b"
    """the architecture (wan: read from the teacher file, with the 1.3B recipe)."""
    teacher: Path | None = None
    """the teacher DiT: official / diffusers / rCM layout (required)."""
    data: Path | None = None
    """the dataset: an `rcm synth` folder, or a folder of the reference's webdataset tars (required)."""
    method: Method = "rcm"
    """rcm, or scm / dmd2 alone."""
    out_dir: Path | None = None
    """run folder; default runs/<model>-<method>."""
    resume: bool = True
    """continue from out_dir's latest checkpoint if there is one."""
    batch_size: int = 1
    """samples per data-parallel rank and iteration (summed, as the reference)."""
    max_latent_frames: int = 20
    """latent frames trained on (the reference's state_t: 20 for 1.3B, 21 for 14B); shorter data is used whole."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(iterations=100_000, checkpoint_every=500))
    loss: RCMConfig = field(default_factory=lambda: RCMConfig())
    student_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))
    critic_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=4e-7))
    ema_sigma_rel: float = 0.1
    """σ_rel of the power-function EMA (the exported student)."""
    sigma_max: float = 80.0
    """σ_max of the student's few-step sampler (periodic samples; 80 for 1.3B, 200 for 14B)."""
    sample_every: int = 500
    """write EMA-student samples every this many iterations (and at the end); 0: only at the end."""
    sample_steps: tuple[int, ...] = (1, 2, 4)
    """student steps of the periodic samples."""
    num_sample_prompts: int = 2
    """the dataset's first prompts, sampled each time."""
    vae_path: Path | None = None
    """the Wan VAE: decode the periodic samples to MP4 (without it only their latents are written)."""
    negative_embedding: Path | None = None
    """the CFG negative-prompt embedding (default: the dataset's; the reference's neg_embed .pt works)."""
    precision: Literal["auto", "bfloat16", "float32"] = "auto"
    """network compute dtype: auto = bf16 on CUDA (fp32 master weights), fp32 on the CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available; under torchrun, each rank's GPU."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the exported EMA student (the released rCM students are bf16)."""
    threads: int = 0
    """torch.set_num_threads; 0 keeps torch's default."""
    compile: bool = False
    """torch.compile each DiT block (inductor; the JVP pass stays eager): 1.33x faster 1.3B student iterations
    on an H100 (docs/benchmarks.md). One process only for now."""
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(activation_checkpointing=True))
    """used when launched by torchrun (activation checkpointing applies to one process too)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_latent_frames < 1:
            raise ValueError(f"--max-latent-frames must be >= 1, got {self.max_latent_frames}")
        if not self.ema_sigma_rel > 0:
            raise ValueError(f"--ema-sigma-rel must be > 0, got {self.ema_sigma_rel}")
        if not self.sigma_max > 0:
            raise ValueError(f"--sigma-max must be > 0, got {self.sigma_max}")
        if self.sample_every < 0 or self.num_sample_prompts < 0 or self.threads < 0:
            raise ValueError("--sample-every, --num-sample-prompts and --threads must be >= 0")
        if not self.sample_steps or any(not 1 <= n <= 4 for n in self.sample_steps):
            raise ValueError(f"--sample-steps must be student step counts in 1..4, got {self.sample_steps}")
        for name in ("teacher", "data", "vae_path", "negative_embedding"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise FileNotFoundError(f"--{name.replace('_', '-')}: no such file or folder: {path}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path("runs") / f"{self.model}-{self.method}"


def _wan_preset(model: str) -> WanDistillConfig:
    """The reference's recipe for a size (RCM_METHOD.md §5.1); "wan" (architecture from the file) uses 1.3B's."""
    from rcm.losses.config import RCM_PRESETS

    if model in ("wan2.1-t2v-1.3b", "wan"):
        return WanDistillConfig(model=model, loss=RCM_PRESETS["wan2.1-t2v-1.3b"])
    if model == "wan2.1-t2v-14b":
        return WanDistillConfig(model=model, loss=RCM_PRESETS[model], max_latent_frames=21,
                                loop=LoopConfig(iterations=100_000, checkpoint_every=250),
                                student_optim=OptimizerConfig(lr=1e-6), critic_optim=OptimizerConfig(lr=1e-7),
                                sigma_max=200.0, sample_every=250)
    raise ValueError(f"unknown Wan model {model!r}")


WAN_DISTILL_PRESETS: dict[str, WanDistillConfig] = {m: _wan_preset(m) for m in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan")}
# The reference's sharding (FSDP shard group / CP size, §5.1): a property of its 32/64-GPU jobs, not a
# default here (any world size runs; --parallel.dp-shard / --parallel.cp set them).
REFERENCE_SHARDING = {"wan2.1-t2v-1.3b": "4 / 1", "wan2.1-t2v-14b": "32 / 8"}


def _time_dist(d) -> str:
    if hasattr(d, "p_mean"):
        return f"LogNormal({d.p_mean:g}, {d.p_std:g})"
    return f"UniformShift({d.shift:g})"


def wan_defaults_table() -> str:
    """The per-size defaults of `rcm distill wan2.1-*`, rendered from ``WAN_DISTILL_PRESETS`` (so the help
    text and docs cannot drift from what runs)."""
    sizes = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")
    p = [WAN_DISTILL_PRESETS[s] for s in sizes]
    rows = [
        ("student LR / fake-score LR", lambda c: f"{c.student_optim.lr:g} / {c.critic_optim.lr:g}"),
        ("Adam betas, weight decay, eps", lambda c: f"({c.student_optim.betas[0]:g}, {c.student_optim.betas[1]:g}), "
                                                    f"{c.student_optim.weight_decay:g}, {c.student_optim.eps:g}"),
        ("LR warmup (linear from 1e-6)", lambda c: f"{c.student_optim.warmup} steps"),
        ("batch per data-parallel rank", lambda c: str(c.batch_size)),
        ("loss scale sCM / DMD", lambda c: f"{c.loss.scm.loss_scale:g} / {c.loss.dmd.loss_scale:g}"),
        ("p_G / p_D", lambda c: f"{_time_dist(c.loss.scm.time_dist)} / {_time_dist(c.loss.dmd.time_dist)}"),
        ("teacher CFG (sCM / DMD)", lambda c: f"{c.loss.scm.guidance:g} / {c.loss.dmd.guidance:g}"),
        ("tangent warmup", lambda c: str(c.loss.scm.tangent_warmup)),
        ("student update freq", lambda c: str(c.loss.student_update_freq)),
        ("max simulation steps (fake)", lambda c: str(c.loss.dmd.max_simulation_steps)),
        ("latent frames (state_t)", lambda c: str(c.max_latent_frames)),
        ("sigma_max (sampling)", lambda c: f"{c.sigma_max:g}"),
        ("EMA", lambda c: f"power, sigma_rel {c.ema_sigma_rel:g}"),
        ("max_iter, checkpoint every", lambda c: f"{c.loop.iterations:,}, {c.loop.checkpoint_every}"),
        ("activation checkpointing", lambda c: "on" if c.parallel.activation_checkpointing else "off"),
        ("FSDP shard / CP (reference)", lambda c: REFERENCE_SHARDING[c.model]),
        ("grad clip", lambda c: "off"),
        ("optimizer", lambda c: "AdamW, fp32 master weights"),
    ]
    lines = [f"| | {sizes[0]} | {sizes[1]} |", "|---|---|---|"]
    lines += [f"| {name} | {f(p[0])} | {f(p[1])} |" for name, f in rows]
    return "\n".join(lines)


def _write_samples(state, task, cfg: WanDistillConfig, run_dir: Path, vae, console) -> dict:
    """EMA-student samples of the fixed prompts at each of ``cfg.sample_steps``: latents (always) and MP4s
    (with a VAE) under run_dir/samples/. Collective under FSDP (every rank samples, rank 0 writes)."""
    from safetensors.torch import save

    from rcm.sample import decode_videos, sample_wan_latent, write_video

    if not cfg.num_sample_prompts:
        return {}
    k = state.iteration
    contexts, prompts = task.fixed_prompts(cfg.num_sample_prompts)
    device = contexts.device
    start = time.perf_counter()
    latents = {}
    for steps in cfg.sample_steps:
        noise = torch.stack([torch.randn(task.latent_shape, generator=torch.Generator().manual_seed(i))
                             for i in range(len(prompts))]).to(device)
        generator = torch.Generator(device=device).manual_seed(0)
        latents[steps] = sample_wan_latent(state.ema, contexts, noise, kind="student", generator=generator,
                                           num_steps=steps, sigma_max=cfg.sigma_max).cpu()
    record = {"iteration": k, "prompts": prompts, "seconds": 0.0, "files": []}
    if _is_rank0():
        folder = run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"iter_{k:08d}.safetensors"
        atomic_write_bytes(path, save({f"{n}step": x.contiguous() for n, x in latents.items()},
                                      metadata={"prompts": json.dumps(prompts), "iteration": str(k)}))
        record["files"].append(path.name)
        if vae is not None:
            for n, x in latents.items():
                for i, video in enumerate(decode_videos(vae, x)):
                    mp4 = write_video(folder / f"iter_{k:08d}_{n}step_{i}.mp4", video)
                    record["files"].append(mp4.name)
        record["seconds"] = round(time.perf_counter() - start, 3)
        with open(folder / "samples.jsonl", "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        console.print(f"samples at iteration {k} → {folder} ({len(record['files'])} files, {record['seconds']:.1f} s)")
    return record


def distill_wan(cfg: WanDistillConfig) -> dict:
    """Run (or resume) a Wan distillation, with periodic samples, then export the EMA student as one
    safetensors file that `rcm sample --model wan --dit-path <file>` loads. Returns a summary dict."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcm.models.checkpoint import load_dit, save_dit
    from rcm.models.wan import WAN_CONFIGS
    from rcm.tasks import WanTask

    console = Console()
    for name in ("teacher", "data"):
        if getattr(cfg, name) is None:
            raise ValueError(f"--{name} is required for rcm distill {cfg.model}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mesh = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from rcm.parallel import init_distributed

        if cfg.compile:
            raise ValueError("--compile is not yet supported under torchrun (untested with FSDP2); drop it")
        mesh = init_distributed(cfg.parallel)
    rank0 = _is_rank0()
    console.quiet = not rank0
    if mesh is not None:
        from rcm.parallel import rank_seed

        device = torch.device(mesh.device_type, torch.cuda.current_device() if mesh.device_type == "cuda" else 0)
        seed = rank_seed(cfg.loop.seed, mesh)
    else:
        from rcm.sample import resolve_device

        device = resolve_device(cfg.device)
        seed = cfg.loop.seed
    # Compute dtype: bf16 on CUDA with fp32 master weights (init_state); FSDP2's policy does it when sharded.
    if mesh is not None or cfg.precision == "float32" or (cfg.precision == "auto" and device.type != "cuda"):
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
    torch.manual_seed(seed)
    run_dir = cfg.run_dir
    loss = method_config(cfg.method, cfg.loss)
    named = WAN_CONFIGS[cfg.model] if cfg.model != "wan" else None
    if named is not None:
        try:  # headers only: a teacher of another size fails here, listing the mismatches
            load_dit(cfg.teacher, config=named, device="meta")
        except ValueError as e:
            raise ValueError(f"--teacher: not a {cfg.model} checkpoint: {e}") from e
    guided = (loss.scm.loss_scale > 0 and loss.scm.guidance > 1) or (loss.dmd_enabled and loss.dmd.guidance > 1)
    task = WanTask(cfg.teacher, cfg.data, cfg.batch_size, cfg.loop.seed, device=device, dtype=dtype,
                   max_frames=cfg.max_latent_frames, config=named, negative_embedding=cfg.negative_embedding,
                   need_negative=guided, rank=0 if mesh is None else mesh.dp_rank,
                   world=1 if mesh is None else mesh.dp_size)
    if mesh is not None:
        # Built on the meta device and sharded before any weight exists; rank 0 alone reads the teacher and
        # broadcasts it into every rank's shards (one copy of a 14B teacher in host memory, not four per rank).
        from rcm.parallel import materialize_train_state, shard_train_state

        state = init_state(task.build_teacher(device="meta"), loss, cfg.student_optim, cfg.critic_optim, seed,
                           device, dtype=dtype)
        shard_train_state(state, mesh, cfg.parallel)
        weights = task.build_teacher(device="cpu").state_dict() if rank0 else None
        materialize_train_state(state, weights, device)
        del weights
    else:
        state = init_state(task.build_teacher(), loss, cfg.student_optim, cfg.critic_optim, seed, device, dtype=dtype)
    if mesh is None and cfg.parallel.activation_checkpointing:
        from rcm.parallel import apply_activation_checkpointing

        for module in (state.student, state.fake_score):  # the networks that backpropagate
            if module is not None:
                apply_activation_checkpointing(module)
    if cfg.compile:  # after activation checkpointing: the compiled call wraps the checkpointed block
        state.compile = "inductor"
    record = {"fingerprint": _fingerprint(cfg), "ema_sigma_rel": cfg.ema_sigma_rel}
    if not cfg.resume and (run_dir / "checkpoints").exists():
        raise ValueError(f"{run_dir} already holds a run; use another --out-dir or drop --no-resume to continue it")
    if cfg.resume and resume_if_possible(state, task, run_dir, record, mesh=mesh):
        console.print(f"[bold]resumed[/] {run_dir} at iteration {state.iteration}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    vae = None
    if cfg.vae_path is not None and rank0:
        from rcm.models.vae import load_vae

        try:
            vae = load_vae(cfg.vae_path, dtype=dtype, device=device)
        except ValueError as e:
            raise ValueError(f"--vae-path: {e}") from e
    n_params = sum(p.numel() for p in state.student.parameters())
    console.print(f"[bold]{cfg.method}[/] distillation of {cfg.model} ({n_params / 1e6:,.0f}M parameters, {dtype}, "
                  f"{device}) on {len(task.dataset)} samples of latent {list(task.latent_shape)} → {run_dir}  "
                  f"({cfg.loop.iterations} iterations, batch {cfg.batch_size})")

    # Seconds per iteration and peak GPU memory join each logged line (run_loop writes the dict after
    # calling `progress`, on rank 0).
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timing = {"last": time.perf_counter(), "steps": []}
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    start = time.perf_counter()
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task(cfg.method, total=cfg.loop.iterations, completed=state.iteration, info="")

        def progress(done: int, total: int, logs: dict) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            logs["seconds_per_iteration"] = round(now - timing["last"], 4)
            timing["steps"].append((logs["phase"], now - timing["last"]))
            timing["last"] = now
            if cuda:  # this iteration's peak; the run's peak is kept for the summary
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                logs["peak_memory_gib"] = round(peak, 3)
                timing["peak"] = max(timing.get("peak", 0.0), peak)
                torch.cuda.reset_peak_memory_stats(device)
            info = "  ".join(f"{k[5:]} {v:.3g}" for k, v in logs.items() if k.startswith("loss_"))
            bar.update(job, completed=done, info=info)

        while state.iteration < cfg.loop.iterations:
            every = cfg.sample_every or cfg.loop.iterations
            target = min(cfg.loop.iterations, (state.iteration // every + 1) * every)
            timing["last"] = time.perf_counter()
            run_loop(state, task, loss, cfg.loop, run_dir, record, progress=progress,
                     stop_after=target - state.iteration, mesh=mesh)
            if state.iteration < cfg.loop.iterations:
                _write_samples(state, task, cfg, run_dir, vae, console)
    train_seconds = time.perf_counter() - start
    _write_samples(state, task, cfg, run_dir, vae, console)

    # Export: the EMA student alone, as one safetensors file (gathered onto rank 0 when sharded).
    student_path = run_dir / "student_ema.safetensors"
    meta = {"kind": "student", "method": cfg.method, "iterations": str(state.iteration), "teacher": str(cfg.teacher)}
    ema = state.ema
    if mesh is not None:
        from rcm.models.wan import WanDiT
        from rcm.parallel import full_model_state_dict

        full = full_model_state_dict(state.ema)
        torch.distributed.barrier()
        if not rank0:
            return {"run_dir": str(run_dir), "rank": torch.distributed.get_rank()}
        ema = WanDiT(task.config)
        ema.load_state_dict(full)
    export = ema.to(device="cpu", dtype=getattr(torch, cfg.export_dtype))  # the run is over: no copy needed
    tmp = student_path.with_name(".student_ema.tmp.safetensors")
    save_dit(export, tmp, metadata=meta)
    os.replace(tmp, student_path)  # a crash mid-export leaves the previous export (or none), never half a file
    steps = timing["steps"]
    summary = {"run_dir": str(run_dir), "student": str(student_path), "train_seconds": train_seconds,
               "seconds_per_iteration": [round(s, 4) for _, s in steps], "phases": [p for p, _ in steps]}
    if cuda:
        summary["peak_memory_gib"] = max(timing.get("peak", 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    console.print(f"student (EMA, {cfg.export_dtype}) → {student_path}   training took {train_seconds:.1f} s"
                  + (f", {train_seconds / len(steps):.2f} s/iteration" if steps else ""))
    return summary


# `rcm distill` alone is the digits demo; `rcm distill <size> ...` a Wan run with that size's defaults.
WanChoice = _OmitPrefixes[Union[
    Annotated[None, _subcommand("digits", None, "the digits demo (the default; its options come before the model name)")],
    Annotated[WanDistillConfig, _subcommand("wan2.1-t2v-1.3b", WAN_DISTILL_PRESETS["wan2.1-t2v-1.3b"],
                                            "Wan2.1 T2V 1.3B, the reference's 1.3B recipe")],
    Annotated[WanDistillConfig, _subcommand("wan2.1-t2v-14b", WAN_DISTILL_PRESETS["wan2.1-t2v-14b"],
                                            "Wan2.1 T2V 14B, the reference's 14B recipe")],
    Annotated[WanDistillConfig, _subcommand("wan", WAN_DISTILL_PRESETS["wan"],
                                            "any Wan2.1 T2V DiT (architecture read from --teacher), 1.3B recipe")],
]]


# ----------------------------------------------------------------------------------------------------------
# `rcm distill`: the digits demo (the embedded default). Wan2.1 distillation plugs in as another task.

# The students learn the teacher's CFG-guided ODE at the guidance the teacher samples with.
DIGITS_LOSS = RCMConfig(
    scm=SCMConfig(guidance=TeacherSampling().guidance, tangent_warmup=100),
    dmd=DMDConfig(guidance=TeacherSampling().guidance),
    student_update_freq=3,
)


@dataclass
class DistillConfig:
    """Distill a teacher into a 1-4 step student with rCM (or sCM / DMD2 alone, for comparison).

    With no arguments: rCM on the shipped digits teacher, on the CPU, writing samples, metrics.json and a
    quality/diversity table to --out-dir. Re-running the same command resumes from the last checkpoint.
    """

    method: Method = "rcm"
    model: Literal["digits"] = "digits"
    teacher: Path | None = None  # None: the shipped teacher (rcm/assets/digits_teacher.safetensors)
    out_dir: Path | None = None  # None: runs/digits-<method>
    resume: bool = True  # continue from out_dir's latest checkpoint if there is one
    batch_size: int = 16
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(iterations=400, checkpoint_every=50))
    loss: RCMConfig = field(default_factory=lambda: DIGITS_LOSS)
    student_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-4, warmup=20))
    critic_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-4, warmup=20))
    ema_sigma_rel: float = 0.1
    report: bool = True  # sample and score teacher and student at the end
    report_settings: DigitsReport = field(default_factory=DigitsReport)
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # used when launched by torchrun
    wan: WanChoice = None
    """a Wan2.1 model size (its own options follow its name; `rcm distill <size> --help`)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise FileNotFoundError(f"--teacher: no file at {self.teacher}")
        if not self.ema_sigma_rel > 0:
            raise ValueError(f"--ema-sigma-rel must be > 0, got {self.ema_sigma_rel}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path("runs") / f"{self.model}-{self.method}"


DistillConfig.__doc__ += (
    "\n\n    Wan2.1: `rcm distill wan2.1-t2v-1.3b --teacher DIT --data DATASET` (`rcm synth` makes the dataset;\n"
    "    `wan` reads the architecture from the teacher). The defaults of each size (RCM_METHOD.md §5.1):\n\n"
    + "\n".join("    " + line for line in wan_defaults_table().splitlines()) + "\n")


# Settings that do not change a run's trajectory: its length, output paths, reporting/sampling, layout.
_NOT_FINGERPRINTED = {
    DistillConfig: ("out_dir", "resume", "report", "report_settings", "threads", "parallel", "wan"),
    WanDistillConfig: ("out_dir", "resume", "threads", "parallel", "device", "sample_every", "sample_steps",
                       "num_sample_prompts", "vae_path", "export_dtype", "compile"),
}


def _fingerprint(cfg: DistillConfig | WanDistillConfig) -> str:
    """Everything that changes the trajectory (of the loop settings, only the seed)."""
    skip = _NOT_FINGERPRINTED[type(cfg)]
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    fields["loop"] = {"seed": cfg.loop.seed}
    return json.dumps(fields, sort_keys=True, default=str)


_DIGITS_DEFAULTS = DistillConfig()


def distill(cfg: DistillConfig) -> dict:
    """Run (or resume) a distillation, export the EMA student, and report. Returns a summary dict."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcm.demo import save_model
    from rcm.tasks import DigitsTask, digits_report

    if cfg.wan is not None:  # a Wan run: the digits options must not be silently ignored
        changed = [f.name for f in dataclasses.fields(DistillConfig)
                   if f.name != "wan" and getattr(cfg, f.name) != getattr(_DIGITS_DEFAULTS, f.name)]
        if changed:
            raise ValueError(f"--{changed[0].replace('_', '-')} was given before the model name {cfg.wan.model}; "
                             f"give Wan options after it (rcm distill {cfg.wan.model} --help)")
        return distill_wan(cfg.wan)
    console = Console()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Under torchrun (WORLD_SIZE > 1) the models are sharded with FSDP2 (and CP) over a mesh; the same loop
    # runs, checkpoints go through DCP, and rank 0 alone logs, exports and reports.
    mesh = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from rcm.parallel import init_distributed, rank_seed, shard_train_state

        mesh = init_distributed(cfg.parallel)
    rank0 = _is_rank0()
    seed = cfg.loop.seed if mesh is None else rank_seed(cfg.loop.seed, mesh)
    torch.manual_seed(seed)
    run_dir = cfg.run_dir
    loss = method_config(cfg.method, cfg.loss)
    task = DigitsTask(cfg.teacher, cfg.batch_size, seed)
    device = torch.device("cpu") if mesh is None else torch.device(mesh.device_type, torch.cuda.current_device()
                                                                   if mesh.device_type == "cuda" else 0)
    state = init_state(task.build_teacher(), loss, cfg.student_optim, cfg.critic_optim, seed, device)
    if mesh is not None:
        shard_train_state(state, mesh, cfg.parallel)
    record = {"fingerprint": _fingerprint(cfg), "ema_sigma_rel": cfg.ema_sigma_rel}
    if not cfg.resume and (run_dir / "checkpoints").exists():
        raise ValueError(f"{run_dir} already holds a run; use another --out-dir or drop --no-resume to continue it")
    console.quiet = not rank0
    if cfg.resume and resume_if_possible(state, task, run_dir, record, mesh=mesh):
        console.print(f"[bold]resumed[/] {run_dir} at iteration {state.iteration}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")

    console.print(f"[bold]{cfg.method}[/] distillation of the digits teacher → {run_dir}  "
                  f"({cfg.loop.iterations} iterations, batch {cfg.batch_size})")
    start = time.perf_counter()
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        job = bar.add_task(cfg.method, total=cfg.loop.iterations, completed=state.iteration, info="")

        def progress(done: int, total: int, logs: dict) -> None:
            info = "  ".join(f"{k[5:]} {v:.3g}" for k, v in logs.items() if k.startswith("loss_"))
            bar.update(job, completed=done, info=info)

        run_loop(state, task, loss, cfg.loop, run_dir, record, progress=progress, mesh=mesh)
    train_seconds = time.perf_counter() - start
    student_path = run_dir / "student_ema.safetensors"
    meta = {"kind": "student", "method": cfg.method, "iterations": state.iteration}
    if mesh is not None:  # gather the sharded EMA onto rank 0 (collective), then continue there alone
        from rcm.parallel import full_model_state_dict

        full = full_model_state_dict(state.ema)
        torch.distributed.barrier()
        if not rank0:
            return {"run_dir": str(run_dir), "rank": torch.distributed.get_rank()}
        ema = task.build_teacher()  # a fresh plain module of the same architecture
        ema.load_state_dict(full)
        state.teacher = task.build_teacher()
        state.ema = ema
    save_model(state.ema, student_path, meta)
    console.print(f"student (EMA) → {student_path}   training took {train_seconds:.0f} s")
    summary = {"run_dir": str(run_dir), "student": str(student_path), "train_seconds": train_seconds}
    if cfg.report:
        teacher_sampling = TeacherSampling(guidance=loss.scm.guidance if loss.scm.guidance > 1 else loss.dmd.guidance)
        summary["rows"] = digits_report(state.teacher, {cfg.method: state.ema.eval()}, run_dir,
                                        cfg.report_settings, teacher_sampling, console=console,
                                        teacher_path=cfg.teacher)
        console.print(f"samples → {run_dir}/samples.png, samples.gif, samples.mp4; metrics → {run_dir}/metrics.json")
    return summary
