"""One training iteration and what it runs on: ``TrainState`` (student, teacher, fake score, EMA, their
optimizers, the generator), ``train_step`` (a student or a critic iteration, docs/method.md §3.1: each loss
term backpropagated as produced, one optimizer step, then the power-function EMA on student iterations),
and the ``Task`` protocol an application implements."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rcm.losses import (
    RCMConfig,
    critic_loss,
    ema_update_,
    power_ema_beta,
    rcm_phase,
    scm_jvp,
    student_iteration_count,
    student_losses,
)
from rcm.train.optim import build_optimizer
from rcm.train.config import OptimizerConfig
from rcm.parallel import gathered_first_term, grads_finite
from rcm.timing import phase




def ema_step_count(k: int, loss: RCMConfig) -> int:
    """n of the power-function EMA at iteration k (docs/method.md §4): the student counter k_S when a fake
    score alternates with the student (§3.1), else the raw iteration (every iteration is a student one)."""
    return student_iteration_count(k, loss.scm.tangent_warmup, loss.student_update_freq) if loss.dmd_enabled else k


class Task(Protocol):
    """What the engine needs from an application (the digits demo, Wan2.1): its teacher, data, outputs."""

    dtype: torch.dtype  # the networks' compute dtype

    def describe(self) -> str:
        """A few words for the console: what is distilled, on what."""

    def build_teacher(self, device: torch.device | str | None = None) -> nn.Module:
        """The teacher (device "meta": its structure only, to shard before any weight exists)."""

    def new_network(self) -> nn.Module:
        """A fresh plain (CPU) network of the teacher's architecture, to gather a sharded one into."""

    def next_batch(self) -> tuple[Tensor, Any]:
        """(x0 [B, C, T, H, W], context) for one iteration; an image-to-video task returns
        (x0, context, condition), its ``FrameCondition`` for every loss of the step (docs/method.md §12)."""

    def negative_context(self, context: Any) -> Any:
        """The CFG negative (null label / negative prompt) matching `context`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def write_samples(self, ema: nn.Module, iteration: int, run_dir: Path, console) -> dict | None:
        """Periodic samples of the EMA student (collective under FSDP: every rank calls it); a returned
        ``{"images": {name: uint8 [H, W(, 3)]}}`` goes to the run's log sinks (TensorBoard, W&B)."""

    def export(self, ema: nn.Module, path: Path, metadata: dict) -> Path | None:
        """Write the final EMA student (a plain module) as one file, atomically; returns where it went
        when not at ``path`` (None: at ``path``)."""

    # Optional: ``network_metadata(network) -> dict[str, str]``, the architecture as file metadata. Checkpoints
    # carry it, so ``rcm export`` writes a file that the application's loader (and ``rcm sample``) accepts.

    def report(self, teacher: nn.Module, ema: nn.Module, run_dir: Path, console) -> dict:
        """Score the finished run (rank 0, plain modules); what it returns joins the run's summary."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


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

    def state_dict(self) -> dict:
        """Everything a one-process resume needs (the local checkpoint backend writes it)."""
        opt = lambda o: None if o is None else o.state_dict()  # noqa: E731
        return {
            "iteration": self.iteration,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "skipped_steps": self.skipped_steps,
            "student": self.student.state_dict(),
            "ema": self.ema.state_dict(),
            "fake_score": None if self.fake_score is None else self.fake_score.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "critic_optimizer": opt(self.critic_optimizer),
            "student_scheduler": self.student_scheduler.state_dict(),
            "critic_scheduler": opt(self.critic_scheduler),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, saved: dict) -> None:
        self.iteration = saved["iteration"]
        self.nonfinite_in_a_row = saved["nonfinite_in_a_row"]
        self.skipped_steps = saved["skipped_steps"]
        self.student.load_state_dict(saved["student"])
        self.ema.load_state_dict(saved["ema"])
        if self.fake_score is not None:
            self.fake_score.load_state_dict(saved["fake_score"])
            self.critic_optimizer.load_state_dict(saved["critic_optimizer"])
            self.critic_scheduler.load_state_dict(saved["critic_scheduler"])
        self.student_optimizer.load_state_dict(saved["student_optimizer"])
        self.student_scheduler.load_state_dict(saved["student_scheduler"])
        self.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])


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
    s_opt, s_sched = build_optimizer(student.parameters(), student_optim)
    c_opt, c_sched = build_optimizer(fake.parameters(), critic_optim) if fake is not None else (None, None)
    generator = torch.Generator(device=device).manual_seed(seed)
    return TrainState(student, teacher, fake, ema, s_opt, c_opt, s_sched, c_sched, generator, compile=compile)


def _on_every_rank(flag: bool) -> bool:
    """`flag` and-ed over all ranks (so every rank skips or steps together); itself without a process group."""
    if not _distributed():
        return flag
    t = torch.tensor(int(flag), device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_rank0() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def _scalar(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach().double().mean().item() if v.numel() else 0.0
    return v


def _grad_norm(module: nn.Module) -> float:
    """The global L2 norm of ``module``'s gradients (collective when they are sharded DTensors)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm.item())


def train_step(state: TrainState, task: Task, loss: RCMConfig, ema_gamma: float, max_nonfinite: int) -> dict:
    """Run iteration `state.iteration` and advance it. Returns the logged scalars."""
    k = state.iteration
    kind = rcm_phase(k, loss)  # "student" or "critic"
    x0, context, *condition = task.next_batch()  # an image-to-video task adds its FrameCondition
    condition = condition[0] if condition else None
    negative = task.negative_context(context)
    logs: dict[str, Any] = {"iteration": k, "phase": kind}
    finite = True
    student, teacher, fake_score, jvp = state.networks()
    if kind == "student":
        module, optimizer, scheduler = state.student, state.student_optimizer, state.student_scheduler
        optimizer.zero_grad(set_to_none=True)
        # gathered_first_term: the sCM JVP pass runs on pre-gathered FSDP parameters (a no-op unsharded).
        terms = gathered_first_term(student_losses(student, teacher, fake_score, x0, context, negative, iteration=k,
                                                   config=loss, generator=state.generator, jvp=jvp,
                                                   condition=condition),
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
                                              generator=state.generator, condition=condition)
        total = per_sample.sum()
        logs["loss_critic"] = total.item()
        logs.update({f"critic_{key}": _scalar(v) for key, v in diagnostics.items()})
        finite = bool(torch.isfinite(total))
        with phase("critic.backward"):
            total.backward()

    finite = _on_every_rank(finite) and grads_finite(module)
    logs[f"{kind}_lr"] = optimizer.param_groups[0]["lr"]  # the rate this step applies
    if finite:  # the same answer on every rank, so the collective norm is entered by all or none
        logs[f"{kind}_grad_norm"] = _grad_norm(module)
    if finite:
        with phase("optimizer"):
            optimizer.step()
            scheduler.step()
        state.nonfinite_in_a_row = 0
        if kind == "student":
            with phase("ema"):
                ema_update_(state.ema, state.student, power_ema_beta(ema_step_count(k, loss), ema_gamma))
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

