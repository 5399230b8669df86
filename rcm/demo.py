"""The embedded default's teacher: a small Wan DiT on moving-digit clips, class-conditioned.

Model: ``ClassConditionedDiT(WanDiT(DEMO_MODELS["digits-dit"]))``. The Wan network is unchanged; a
learned label embedding turns labels 0..9 (and the null label 10, for classifier-free guidance) into
the ``context`` tokens ``[B, text_len, text_dim]`` that Wan's cross-attention reads in place of umT5
text embeddings. Its forward is ``(x, timestep, labels) -> velocity``, so everything that calls a
network as ``net(x, 1000ρ, context)`` (losses, samplers, CFG) works with ``context = labels``
(a LongTensor ``[B]``) and ``negative_context = null_labels(labels)``.

Teacher training (``train_teacher``) is Wan's rectified flow in pixel space:
    x_ρ = (1 − ρ) x0 + ρ ε,   ρ = sigmoid(n), n ~ N(rho_mean, rho_std²)  (logit-normal)
    loss = mean (v_θ(x_ρ, 1000ρ, y) − (ε − x0))²,   y → null with probability label_dropout
AdamW, linear warmup then cosine decay, gradient clipping, fixed-decay EMA of the weights (the
exported teacher), periodic resumable checkpoints (``rcm.checkpoint``), rich progress.

Sampling (``sample_teacher``) uses the project's flow samplers (``rcm.samplers``): UniPC or Euler
over Wan's shifted schedule with CFG v = v_u + w (v_c − v_u).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from rcm.data import NUM_CLASSES, ClipBatches, ClipSpec
from rcm.models.wan import WanConfig, WanDiT

ASSETS = Path(__file__).parent / "assets"
TEACHER_PATH = ASSETS / "digits_teacher.safetensors"
NULL_LABEL = NUM_CLASSES  # label 10: "no class", the CFG negative

DEMO_SPEC = ClipSpec(frames=8, size=16)

DEMO_MODELS: dict[str, WanConfig] = {
    # The shipped teacher. Patch (1, 4, 4): 8 × 4 × 4 = 128 tokens per 8×16×16 clip. With Wan's
    # (1, 2, 2) the same clip is 512 tokens and a training step measured ~10× slower on the 2-core
    # CPU (attention is quadratic), which would not fit the CPU time budget of the demo.
    "digits-dit": WanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, in_dim=1, out_dim=1,
                            patch_size=(1, 4, 4), text_len=4, text_dim=64, freq_dim=64),
    # For tests: the smallest Wan the attention op accepts (head dim 64), one block.
    "digits-dit-tiny": WanConfig(dim=64, ffn_dim=128, num_heads=1, num_layers=1, in_dim=1, out_dim=1,
                                 patch_size=(1, 4, 4), text_len=2, text_dim=16, freq_dim=32),
}


# --------------------------------------------------------------------------------------------
# label conditioning


class ClassConditionedDiT(nn.Module):
    """A Wan DiT conditioned on class labels: ``forward(x, timestep, labels) -> velocity``.

    ``label_embedding`` maps label ``y`` ∈ {0..num_classes} (``num_classes`` = null) to
    ``text_len`` tokens of size ``text_dim``, fed to the DiT as its ``context``.
    """

    def __init__(self, dit: WanDiT, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.dit = dit
        self.num_classes = num_classes
        cfg = dit.config
        self.label_embedding = nn.Embedding(num_classes + 1, cfg.text_len * cfg.text_dim)

    @property
    def config(self) -> WanConfig:
        return self.dit.config

    @property
    def null_label(self) -> int:
        return self.num_classes

    def context(self, labels: Tensor) -> Tensor:
        """``[B]`` labels → context tokens ``[B, text_len, text_dim]``."""
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be an integer tensor [B] (0..{self.num_classes}, "
                             f"{self.num_classes} = null), got "
                             f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}"
                             f"{'' if not isinstance(labels, Tensor) else ' ' + str(labels.dtype)}")
        cfg = self.dit.config
        return self.label_embedding(labels).unflatten(1, (cfg.text_len, cfg.text_dim))

    def forward(self, x: Tensor, timestep: Tensor, labels: Tensor) -> Tensor:
        return self.dit(x, timestep, self.context(labels))


def null_labels(labels: Tensor) -> Tensor:
    """The CFG negative condition for ``labels``: the null label, same shape and device."""
    return torch.full_like(labels, NULL_LABEL)


def build_model(name: str = "digits-dit", seed: int = 0) -> ClassConditionedDiT:
    """A freshly initialised demo model (deterministic for ``seed``)."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; valid names: {', '.join(DEMO_MODELS)}")
    g = torch.Generator().manual_seed(seed)
    dit = WanDiT(DEMO_MODELS[name])
    dit.init_weights(generator=g)
    model = ClassConditionedDiT(dit)
    nn.init.normal_(model.label_embedding.weight, std=1.0, generator=g)
    return model


def save_model(model: ClassConditionedDiT, path: str | Path, metadata: dict | None = None) -> None:
    """Weights as safetensors; the architecture travels in the metadata, so ``load_model`` needs
    nothing else."""
    from safetensors.torch import save_file

    meta = {"wan_config": json.dumps(asdict(model.config)), "num_classes": str(model.num_classes),
            **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> ClassConditionedDiT:
    """A model saved by ``save_model`` (strict: every key must match), in eval mode, frozen. A missing
    file is a FileNotFoundError; a truncated, corrupt or mismatched one a ValueError naming the file."""
    from rcm.models.checkpoint import load_state_dict_strict, open_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model weights at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: not a .safetensors file written by rcm.demo.save_model")
    weights = open_state_dict(path)  # the header only: a truncated or corrupt file fails here
    meta = weights.metadata
    if "wan_config" not in meta:
        raise ValueError(f"{path} has no 'wan_config' metadata: not saved by rcm.demo.save_model")
    try:
        wan = json.loads(meta["wan_config"])
        wan["patch_size"] = tuple(wan["patch_size"])
        model = ClassConditionedDiT(WanDiT(WanConfig(**wan)), int(meta.get("num_classes", 10)))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: unreadable architecture metadata ({type(e).__name__}: {e})") from e
    load_state_dict_strict(model, weights, what="digits model", source=str(path))  # all mismatches, one ValueError
    return model.to(dtype).eval().requires_grad_(False)


def load_teacher(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ClassConditionedDiT:
    """The shipped digits teacher (``rcm/assets/digits_teacher.safetensors``) or ``path``."""
    return load_model(TEACHER_PATH if path is None else path, dtype)


def model_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# sampling


@dataclass
class TeacherSampling:
    """How the teacher samples: ``steps`` of ``sampler`` over Wan's shifted schedule, CFG ``guidance``."""

    steps: int = 50
    guidance: float = 2.0
    shift: float = 1.0
    sigma_max: float = 5000.0
    sampler: Literal["unipc", "euler"] = "unipc"


@torch.no_grad()
def sample_teacher(model: nn.Module, labels: Tensor, generator: torch.Generator,
                   cfg: TeacherSampling = TeacherSampling(), spec: ClipSpec = DEMO_SPEC, progress=None) -> Tensor:
    """Clips ``[N, 1, T, H, W]`` float32 in [-1, 1] (clamped) of the requested ``labels``."""
    from rcm.samplers import sample_euler, sample_unipc, shifted_flow_times, teacher_velocity

    noise = torch.randn((len(labels), *spec.shape), generator=generator)
    velocity = teacher_velocity(model, labels, guidance=cfg.guidance, negative_context=null_labels(labels))
    times = shifted_flow_times(cfg.steps, shift=cfg.shift, sigma_max=cfg.sigma_max)
    run = {"unipc": sample_unipc, "euler": sample_euler}[cfg.sampler]
    return run(velocity, noise, times, progress=progress).float().clamp(-1, 1)


def teacher_generator(model: nn.Module, cfg: TeacherSampling = TeacherSampling(), spec: ClipSpec = DEMO_SPEC):
    """The teacher as an ``rcm.evaluate`` generator ``(labels, generator) -> clips``."""
    return lambda labels, g: sample_teacher(model, labels, g, cfg, spec)


@torch.no_grad()
def sample_student(model: nn.Module, labels: Tensor, generator: torch.Generator, steps: int = 2,
                   sigma_max: float = 80.0, mid_times=None, spec: ClipSpec = DEMO_SPEC, progress=None) -> Tensor:
    """Few-step consistency samples ``[N, 1, T, H, W]`` float32 in [-1, 1] (clamped) of a distilled
    student (no CFG: the student has it baked in), RCM_METHOD.md §5.2."""
    from rcm.samplers import consistency_times, sample_consistency, student_denoiser

    noise = torch.randn((len(labels), *spec.shape), generator=generator)
    times = consistency_times(steps, sigma_max=sigma_max, mid_times=mid_times)
    out = sample_consistency(student_denoiser(model, labels), noise, times, generator=generator, progress=progress)
    return out.float().clamp(-1, 1)


def student_generator(model: nn.Module, steps: int = 2, sigma_max: float = 80.0, mid_times=None,
                      spec: ClipSpec = DEMO_SPEC):
    """A student as an ``rcm.evaluate`` generator ``(labels, generator) -> clips``."""
    return lambda labels, g: sample_student(model, labels, g, steps, sigma_max, mid_times, spec)


# --------------------------------------------------------------------------------------------
# teacher training


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
    threads: int = 0  # torch.set_num_threads; 0 leaves torch's default
    spec: ClipSpec = field(default_factory=lambda: DEMO_SPEC)

    def __post_init__(self):
        if self.model not in DEMO_MODELS:
            raise ValueError(f"unknown demo model {self.model!r}; valid names: {', '.join(DEMO_MODELS)}")
        if self.steps < 0 or self.batch_size < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError(f"need steps >= 0, batch_size, checkpoint_every, log_every >= 1; got {self}")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("label_dropout and ema_decay must lie in [0, 1)")


def rectified_flow_loss(model: nn.Module, x0: Tensor, labels: Tensor, generator: torch.Generator,
                        label_dropout: float = 0.1, rho_mean: float = 0.0, rho_std: float = 1.0) -> Tensor:
    """Per-sample mean squared velocity error ``[B]`` of Wan's rectified flow, with labels dropped to
    the null label with probability ``label_dropout``. All draws come from ``generator``."""
    b = x0.shape[0]
    rho = torch.sigmoid(rho_mean + rho_std * torch.randn(b, generator=generator))
    eps = torch.randn(x0.shape, generator=generator)
    drop = torch.rand(b, generator=generator) < label_dropout
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
    after that many steps of this call, as if interrupted (tests).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from rcm.checkpoint import load_latest, save_checkpoint
    from rcm.losses import ema_update_

    console = console or Console()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = _config_record(cfg)
    resume_keys = {k: v for k, v in record.items() if k not in ("out_dir", "export", "resume", "threads", "log_every",
                                                                 "checkpoint_every", "keep_checkpoints")}

    model = build_model(cfg.model, seed=cfg.seed).train()
    ema = build_model(cfg.model, seed=cfg.seed).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    batches = ClipBatches("train", cfg.batch_size, seed=cfg.seed, spec=cfg.spec)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    step, seconds_before, cpu_before = 0, 0.0, 0.0

    found = load_latest(out_dir / "checkpoints") if cfg.resume else None
    if found is not None:
        saved, path = found
        if saved["config"] != resume_keys:
            raise ValueError(f"{path} was written with different settings; use another out_dir or resume=False.\n"
                             f"  saved: {saved['config']}\n  now:   {resume_keys}")
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
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress, open(out_dir / "log.jsonl", "a") as log:
        task = progress.add_task("teacher", total=cfg.steps, completed=step)
        while step < cfg.steps:
            x0, labels = next(batches)
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
