"""`distill`: the one driver of every application (mesh, seed, state, resume, loop, export, report).

An application builds its task from its config and a ``Run`` (``start_run``), then calls ``distill``;
the driver imports no application and no command."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rcm import ConfigError, out_of_memory_as
from rcm.checkpoint import checkpointer
from rcm.checkpoint.atomic import atomic_write_bytes
from rcm.checkpoint.card import write_card
from rcm.checkpoint.run_folder import claimed_folder
from rcm.losses import RCMConfig
from rcm.timing import progress_bar, sync
from rcm.train.config import DistillConfig, method_config
from rcm.train.loop import loop_callbacks, resume, run_loop
from rcm.train.plots import plot_run_log
from rcm.train.sinks import LogSinks, check_sink_packages
from rcm.train.step import Task, TrainState, init_state, is_rank0





@dataclass
class Run:
    """Where a run executes: its mesh (None: one process), device, this rank's seed, the console."""

    mesh: Any
    device: torch.device
    seed: int
    console: Any

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.dp_rank

    @property
    def dp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.dp_size


def start_run(cfg: DistillConfig, device: torch.device | str = "cpu") -> Run:
    """The log sinks' packages checked; threads, the process group and mesh under torchrun (WORLD_SIZE > 1:
    FSDP2 and CP over the ranks, each on its own GPU; rank 0 alone prints), the seed of this rank."""
    from rich.console import Console

    check_sink_packages("log", cfg.log)  # before any work: a missing package asked for is a one-line error
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mesh = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from rcm.parallel import init_distributed, rank_seed

        mesh = init_distributed(cfg.parallel)
        device = torch.device(mesh.device_type, torch.cuda.current_device() if mesh.device_type == "cuda" else 0)
    seed = cfg.loop.seed if mesh is None else rank_seed(cfg.loop.seed, mesh)
    device = torch.device(device)
    torch.manual_seed(seed)
    console = Console()
    console.quiet = not is_rank0()
    return Run(mesh, device, seed, console)


def _build_state(task: Task, cfg: DistillConfig, loss: RCMConfig, run: Run) -> TrainState:
    if run.mesh is None:
        state = init_state(task.build_teacher(), loss, cfg.student_optim, cfg.critic_optim, run.seed, run.device,
                           dtype=task.dtype)
        if cfg.parallel.activation_checkpointing:
            from rcm.parallel import apply_activation_checkpointing

            for module in (state.student, state.fake_score):  # the networks that backpropagate
                if module is not None:
                    apply_activation_checkpointing(module)
        return state
    # Built on the meta device and sharded before any weight exists; rank 0 alone reads the teacher and
    # broadcasts it into every rank's shards (one copy of a 14B teacher in host memory, not one per rank).
    from rcm.parallel import materialize_train_state, shard_train_state

    state = init_state(task.build_teacher(device="meta"), loss, cfg.student_optim, cfg.critic_optim, run.seed,
                       run.device, dtype=task.dtype)
    shard_train_state(state, run.mesh, cfg.parallel)
    weights = task.build_teacher(device="cpu").state_dict() if is_rank0() else None
    materialize_train_state(state, weights, run.device)
    return state


class _Progress:
    """Callback (rank 0): the progress bar, and each iteration's seconds (and peak GPU memory) in its logs."""

    def __init__(self, bar, job, device: torch.device):
        self.bar, self.job, self.device = bar, job, device
        self.cuda = device.type == "cuda"
        self.last, self.steps, self.peak = time.perf_counter(), [], 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def __call__(self, state: TrainState, logs: dict) -> None:
        if not is_rank0():
            return
        sync(self.device)
        now = time.perf_counter()
        logs["seconds_per_iteration"] = round(now - self.last, 4)
        self.steps.append((logs["phase"], now - self.last))
        self.last = now
        if self.cuda:  # this iteration's peak; the run's peak is kept for the summary
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            logs["peak_memory_gib"] = round(peak, 3)
            self.peak = max(self.peak, peak)
            torch.cuda.reset_peak_memory_stats(self.device)
        info = "  ".join(f"{k[5:]} {v:.3g}" for k, v in logs.items() if k.startswith("loss_"))
        self.bar.update(self.job, completed=state.iteration, info=info)


def distill(task: Task, cfg: DistillConfig, run: Run) -> dict:
    """Run (or resume) a distillation of ``task``'s teacher, with periodic samples, then export the EMA
    student and report. Returns a summary dict (on ranks other than 0: the run folder and the rank)."""
    run_dir = cfg.run_dir
    # one writer, and only an rcm run's files, before any write and before the models are built
    with claimed_folder(run_dir, "distill", resume=cfg.resume, legacy=("checkpoints",)):
        return _distill_locked(task, cfg, run, run_dir)


def _distill_locked(task: Task, cfg: DistillConfig, run: Run, run_dir: Path) -> dict:
    console, mesh, rank0 = run.console, run.mesh, is_rank0()
    loss = method_config(cfg.method, cfg.loss)
    too_big = "lower --batch-size (or the sizes of the data)"  # the sizes that were not estimated up front
    with out_of_memory_as("batch_size", too_big):
        state = _build_state(task, cfg, loss, run)
    if getattr(cfg, "compile", False):  # after activation checkpointing: the compiled call wraps the checkpointed block
        state.compile = "inductor"
    record = {"fingerprint": cfg.fingerprint(), "ema_sigma_rel": cfg.ema_sigma_rel}
    describe_network = getattr(task, "network_metadata", None)  # optional: what `rcm export` writes beside the weights
    if describe_network is not None:
        record["network"] = describe_network(state.student)
    describe_card = getattr(task, "card", None)  # optional: the model card's facts (rcm.checkpoint.card)
    if describe_card is not None:
        record["card"] = describe_card({})  # so that `rcm export` of any checkpoint writes the card too
    ckpt = checkpointer(run_dir / "checkpoints", mesh, keep=cfg.loop.keep_checkpoints)
    if cfg.resume and resume(state, task, ckpt, record) is not None:
        if state.iteration > cfg.loop.iterations:  # exporting would hand out the later weights as the shorter run's
            raise ConfigError("loop.iterations", f"{run_dir} has already run {state.iteration} iterations, more than "
                                                 f"{cfg.loop.iterations}; give at least {state.iteration}, or another --out-dir")
        console.print(f"[bold]resumed[/] {run_dir} at iteration {state.iteration}")
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.json",
                           (json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n").encode())
    n_params = sum(p.numel() for p in state.student.parameters())
    console.print(f"[bold]{cfg.method}[/] distillation of {task.describe()} ({n_params / 1e6:,.2f}M parameters, "
                  f"{task.dtype}, {run.device}) → {run_dir}  ({cfg.loop.iterations} iterations, batch {cfg.batch_size})")

    sinks = LogSinks(cfg.log, run_dir, cfg.loop.log_every, state.iteration,
                     config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))

    def write_samples(iteration: int) -> None:  # the task's samples, and the images it hands back to the sinks
        written = task.write_samples(state.ema, iteration, run_dir, console)
        if isinstance(written, dict) and written.get("images"):
            sinks.images(iteration, written["images"])

    def samples(state: TrainState, logs: dict) -> None:
        if cfg.sample_every and state.iteration % cfg.sample_every == 0 and state.iteration < cfg.loop.iterations:
            write_samples(state.iteration)
            progress.last = time.perf_counter()  # sampling is not part of the next iteration's seconds

    start = time.perf_counter()
    try:
        with progress_bar(console, info=True) as bar:
            job = bar.add_task(cfg.method, total=cfg.loop.iterations, completed=state.iteration, info="")
            progress = _Progress(bar, job, run.device)
            callbacks = [progress, *loop_callbacks(state, task, run_dir, record, cfg.loop, ckpt,
                                                   json_log="jsonl" in cfg.log), sinks, samples]
            with out_of_memory_as("batch_size", too_big):
                run_loop(state, task, loss, cfg.loop, callbacks, cfg.ema_sigma_rel)
        train_seconds = time.perf_counter() - start
        write_samples(state.iteration)
    finally:  # a run stopped by an error keeps what its sinks have received
        sinks.close()
    if rank0 and "jsonl" in cfg.log and (run_dir / "log.jsonl").is_file() and (plot := plot_run_log(run_dir)):
        console.print(f"log plot → {plot}")

    # Export: the EMA student alone, as one file (gathered onto rank 0 when sharded).
    ema, teacher = state.ema, state.teacher
    if mesh is not None:
        from rcm.parallel import full_model_state_dict

        full = full_model_state_dict(state.ema)
        torch.distributed.barrier()
        if not rank0:
            return {"run_dir": str(run_dir), "rank": torch.distributed.get_rank()}
        ema = task.new_network()
        ema.load_state_dict(full)
        teacher = task.build_teacher(device="cpu")
    student_path = run_dir / "student_ema.safetensors"
    # a task may write elsewhere (a two-expert student: a folder of two DiTs) and says where
    student_path = task.export(ema, student_path, {"kind": "student", "method": cfg.method,
                                                   "iterations": str(state.iteration)}) or student_path
    steps = progress.steps
    summary = {"run_dir": str(run_dir), "student": str(student_path), "train_seconds": train_seconds,
               "seconds_per_iteration": [round(s, 4) for _, s in steps], "phases": [p for p, _ in steps]}
    if progress.cuda:
        summary["peak_memory_gib"] = max(progress.peak, torch.cuda.max_memory_allocated(run.device) / 2**30)
    console.print(f"student (EMA) → {student_path}   training took {train_seconds:.1f} s"
                  + (f", {train_seconds / len(steps):.2f} s/iteration" if steps else ""))
    summary.update(task.report(teacher, ema.eval(), run_dir, console))
    if describe_card is not None:  # the exported student's card, with the report's metrics where it has them
        card = describe_card(summary)
        summary["card"] = str(write_card(student_path, **card, method=cfg.method, iterations=state.iteration))
    return summary
