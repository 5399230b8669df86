"""`rcm train-teacher`: how the shipped digits teacher was trained (Wan's rectified flow in pixel space).

    x_ρ = (1 − ρ) x0 + ρ ε,   ρ = sigmoid(n), n ~ N(rho_mean, rho_std²)  (logit-normal)
    loss = mean (v_θ(x_ρ, 1000ρ, y) − (ε − x0))²,   y → null with probability label_dropout
AdamW, linear warmup then cosine decay, gradient clipping, fixed-decay EMA of the weights (the
exported teacher), periodic resumable checkpoints (``rcm.checkpoint``), the one progress bar. A small
loop of its own: a plain supervised objective, not the distillation engine's student/critic schedule.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from rcm import ConfigError, out_of_memory_as
from rcm.digits.config import TrainTeacherConfig
from rcm.digits.data import ClipBatches
from rcm.sample import resolve_device
from rcm.timing import progress_bar
from rcm.digits.model import DEMO_MODELS, NULL_LABEL, build_model, save_model


def rectified_flow_loss(model: nn.Module, x0: Tensor, labels: Tensor, generator: torch.Generator,
                        label_dropout: float = 0.1, rho_mean: float = 0.0, rho_std: float = 1.0) -> Tensor:
    """Per-sample mean squared velocity error ``[B]`` of Wan's rectified flow, with labels dropped to
    the null label with probability ``label_dropout``. All draws come from ``generator``."""
    b = x0.shape[0]
    device = generator.device  # the draws are made where the generator lives (the batch's device)
    rho = torch.sigmoid(rho_mean + rho_std * torch.randn(b, generator=generator, device=device))
    eps = torch.randn(x0.shape, generator=generator, device=device)
    drop = torch.rand(b, generator=generator, device=device) < label_dropout
    labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
    r = rho.view(b, 1, 1, 1, 1)
    x_rho = (1 - r) * x0 + r * eps
    v = model(x_rho, 1000.0 * rho, labels)
    return (v - (eps - x0)).square().flatten(1).mean(1)


def _lr_factor(step: int, cfg: TrainTeacherConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _config_record(cfg: TrainTeacherConfig) -> dict:
    rec = asdict(cfg)
    return json.loads(json.dumps(rec, default=str))


def train_teacher(cfg: TrainTeacherConfig, console=None, stop_after: int | None = None) -> Path | None:
    """Train (or resume) a teacher; export its EMA weights as safetensors and return that path.

    ``cfg.out_dir`` gets ``checkpoints/`` (resumable: a rerun of the same command continues from the
    newest checkpoint and ends bit-identical to an uninterrupted run), ``log.jsonl`` and
    ``teacher.safetensors`` (or ``cfg.export``). ``stop_after``: return (None, nothing exported)
    after that many steps of this call, as if interrupted (tests). The run folder (and an ``--export``
    outside it) is claimed for this process first (``rcm.checkpoint.run_folder``).
    """
    from contextlib import ExitStack

    from rcm.checkpoint.run_folder import claimed_file, claimed_folder

    if cfg.model not in DEMO_MODELS:  # here, not in the config: the model table imports torch (the help must not)
        raise ConfigError("model", f"unknown demo model {cfg.model!r}; valid names: {', '.join(DEMO_MODELS)}")
    with ExitStack() as claims:
        claims.enter_context(claimed_folder(cfg.out_dir, "train-teacher", resume=cfg.resume, legacy=("checkpoints",)))
        if cfg.export is not None and Path(cfg.export).parent.resolve() != Path(cfg.out_dir).resolve():
            claims.enter_context(claimed_file(cfg.export, "export"))
        return _train_teacher(cfg, console, stop_after)


def _train_teacher(cfg: TrainTeacherConfig, console, stop_after: int | None) -> Path | None:
    from rich.console import Console

    from rcm.checkpoint import load_latest, save_checkpoint
    from rcm.losses import ema_update_

    console = console or Console()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    record = _config_record(cfg)
    resume_keys = {k: v for k, v in record.items() if k not in ("out_dir", "export", "resume", "threads", "device", "log_every",
                                                                 "checkpoint_every", "keep_checkpoints")}
    # the effective CPU thread count changes float sums, so the trajectory: a resume must keep it (as distill's)
    resume_keys["threads"] = torch.get_num_threads()

    device = resolve_device(cfg.device)
    model = build_model(cfg.model, seed=cfg.seed).to(device).train()
    ema = build_model(cfg.model, seed=cfg.seed).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    batches = ClipBatches("train", cfg.batch_size, seed=cfg.seed, spec=cfg.spec)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)
    step, seconds_before, cpu_before = 0, 0.0, 0.0

    found = load_latest(out_dir / "checkpoints") if cfg.resume else None
    if found is not None:
        saved, path = found
        if "threads" not in saved["config"]:  # a run saved before the thread count was recorded
            resume_keys.pop("threads")
        if saved["config"] != resume_keys:  # only the differing flags, briefly (never the whole config)
            from rcm.checkpoint.fingerprint import flatten, mismatch_message

            raise ConfigError("out_dir", f"{out_dir} holds a teacher run with different settings: "
                                         f"{mismatch_message(flatten(saved['config']), flatten(resume_keys))}; "
                                         f"use another --out-dir or --no-resume")
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["data"])
        generator.set_state(saved["generator"])
        step, seconds_before, cpu_before = saved["step"], saved["seconds"], saved.get("cpu_seconds", 0.0)
        console.log(f"resumed from {path} at step {step}")

    def checkpoint(seconds: float, cpu_seconds: float):
        save_checkpoint(out_dir / "checkpoints", step, {
            "step": step, "seconds": seconds, "cpu_seconds": cpu_seconds, "config": resume_keys, "model": model.state_dict(),
            "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "data": batches.state_dict(), "generator": generator.get_state()}, keep=cfg.keep_checkpoints)

    n_params = sum(p.numel() for p in model.parameters())
    console.log(f"teacher {cfg.model}: {n_params / 1e6:.2f}M parameters, {cfg.steps} steps of batch {cfg.batch_size}")
    start, start_cpu, start_step = time.perf_counter(), time.process_time(), step
    with progress_bar(console) as progress, open(out_dir / "log.jsonl", "a") as log, \
            out_of_memory_as("batch_size", "lower --batch-size"):
        task = progress.add_task("teacher", total=cfg.steps, completed=step)
        while step < cfg.steps:
            x0, labels = (t.to(device, non_blocking=True) for t in next(batches))
            loss = rectified_flow_loss(model, x0, labels, generator, cfg.label_dropout, cfg.rho_mean, cfg.rho_std).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            ema_update_(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            progress.update(task, advance=1, description=f"teacher loss {loss.item():.4f}")
            seconds = seconds_before + time.perf_counter() - start
            cpu_seconds = cpu_before + time.process_time() - start_cpu
            if step % cfg.log_every == 0 or step == cfg.steps:
                entry = {"step": step, "loss": round(loss.item(), 6), "grad_norm": round(grad_norm.item(), 4),
                         "lr": sched.get_last_lr()[0], "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1)}
                log.write(json.dumps(entry) + "\n")
                log.flush()
                progress.console.log(" ".join(f"{k} {v}" for k, v in entry.items()))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint(seconds, cpu_seconds)
            if stop_after is not None and step - start_step >= stop_after and step < cfg.steps:
                return None

    seconds = seconds_before + time.perf_counter() - start
    cpu_seconds = cpu_before + time.process_time() - start_cpu
    export = Path(cfg.export) if cfg.export is not None else out_dir / "teacher.safetensors"
    save_model(ema, export, {"recipe": record, "train_seconds": f"{seconds:.0f}",
                             "train_cpu_seconds": f"{cpu_seconds:.0f}", "steps": str(step)})
    console.log(f"teacher: {step} steps in {seconds / 60:.1f} min ({cpu_seconds / 60:.1f} CPU-min, "
                f"{torch.get_num_threads()} threads); EMA weights → {export}")
    return export
