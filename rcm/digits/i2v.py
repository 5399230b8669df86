"""Image-to-video digits, issue 18's miniature: the first frame given, the motion generated (docs/i2v.md).

The shipped digits teacher's architecture (``ClassConditionedDiT`` around a ``WanDiT``) conditioned the way
Wan2.2 TI2V is, by frame replacement (docs/method.md §12.1): in pixel space the "latent" is the clip itself;
its frame 0 is the given image, kept clean in every state, at time 0; the network gets the per-frame
timestep map. The losses, samplers and training engine are the text-to-video ones with ``condition=``.

* **The I2V teacher** (``finetune_i2v_teacher``, ``rcm train-i2v-teacher``): the shipped T2V teacher
  fine-tuned with that conditioning (Wan's rectified-flow loss over the generated frames), shipped as
  ``rcm/assets/digits_i2v_teacher.safetensors``.
* **Distillation** (``rcm distill digits-i2v``): rCM on it, each batch's first frames as its condition.
  ``--experts two``: the two-expert teacher, the I2V teacher twice switched at ``--boundary`` (one student
  per expert, each initialised from its expert; docs/method.md §12.3).
* **The report** (``i2v_report``): the given frame's reproduction error (bound ``GIVEN_FRAME_BOUND``), the
  digit kept (the clip classifier's accuracy for the clip's label), the motion's continuity from the given
  frame, each student against its teacher from the same noise and image, and the per-frame metrics of
  ``rcm.digits.metrics`` (frame accuracy, switching share, frame FD, diversity, ...) of every row.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from rcm.digits.config import DigitsI2VDistillConfig, FinetuneI2VConfig, I2VReport
from rcm.digits.classifier import classifier_accuracy, load_classifier
from rcm.digits.data import ClipBatches, DigitClips, clip_grid
from rcm.digits.model import (
    ASSETS,
    DEMO_SPEC,
    TeacherSampling,
    load_model,
    load_teacher,
    null_labels,
    save_model,
)
from rcm.digits.task import DigitsTask
from rcm.media import write_image
from rcm.models import WanExperts
from rcm.models.trigflow import RF_TIMESTEP_SCALE, FrameCondition
from rcm.train import distill, start_run

I2V_TEACHER_PATH = ASSETS / "digits_i2v_teacher.safetensors"
GIVEN_FRAMES = 1
# The samplers impose the given frame with torch.where, so it comes back bit-exact in the clip's dtype;
# the bound leaves room only for a cast (fp32 clips through fp64 samplers and back).
GIVEN_FRAME_BOUND = 1e-6


def first_frame_condition(clips: Tensor) -> FrameCondition:
    """The condition "the first frame of ``clips`` [B, 1, T, H, W] is given"."""
    mask = torch.zeros(1, 1, clips.shape[2], 1, 1, dtype=torch.bool, device=clips.device)
    mask[:, :, :GIVEN_FRAMES] = True
    return FrameCondition(clips, mask)


# --------------------------------------------------------------------------------------------
# the I2V teacher


def i2v_flow_loss(model: nn.Module, x0: Tensor, labels: Tensor, generator: torch.Generator,
                  rho_mean: float = 0.0, rho_std: float = 1.0) -> Tensor:
    """The teacher's rectified-flow loss with the first frame given: x_ρ = (1 − ρ) x0 + ρ ε on the generated
    frames, x0 on the given one (its timestep 0), ρ logit-normal; the mean of (v − (ε − x0))² over the
    generated frames (the given frame carries no target: its velocity is 0 by construction)."""
    condition = first_frame_condition(x0)
    rho = torch.sigmoid(rho_mean + rho_std * torch.randn(len(x0), generator=generator)).view(-1, 1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    x = condition.impose((1 - rho) * x0 + rho * noise)
    timestep = torch.where(condition.mask, 0.0, RF_TIMESTEP_SCALE * rho).expand(len(x0), 1, x0.shape[2], 1, 1)
    v = model(x, timestep, labels)
    return (v - (noise - x0))[:, :, GIVEN_FRAMES:].pow(2).mean()


def finetune_i2v_teacher(cfg: FinetuneI2VConfig, log=print) -> nn.Module:
    """``rcm train-i2v-teacher``: AdamW on ``i2v_flow_loss``, writes ``cfg.out`` (atomically) and returns
    the teacher (eval, frozen). Deterministic for a seed and a thread count. ``cfg.out`` is claimed for this
    process first (``rcm.checkpoint.run_folder.claimed_file``)."""
    from rcm.checkpoint.run_folder import claimed_file

    with claimed_file(cfg.out, "out"):
        return _finetune_i2v_teacher(cfg, log)


def _finetune_i2v_teacher(cfg: FinetuneI2VConfig, log) -> nn.Module:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load_teacher(cfg.teacher).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    batches = ClipBatches("train", batch_size=cfg.batch_size, seed=cfg.seed, spec=DEMO_SPEC)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, running = time.perf_counter(), None
    for step in range(cfg.steps):
        x0, labels = next(batches)
        dropped = torch.rand(len(labels), generator=generator) < cfg.label_dropout
        loss = i2v_flow_loss(model, x0, torch.where(dropped, null_labels(labels), labels), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}  loss {running:.4f}  {time.perf_counter() - start:.0f} s")
    model.eval().requires_grad_(False)
    save_model(model, Path(cfg.out), {"conditioning": "first frame given (frame replacement)",  # atomic
                                      "recipe": {k: str(v) for k, v in asdict(cfg).items()}})
    return model


def load_i2v_teacher(path: Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    return load_model(I2V_TEACHER_PATH if path is None else path, device=device)


# --------------------------------------------------------------------------------------------
# sampling: the digits samplers with the first frame given


@torch.no_grad()
def sample_i2v_teacher(model: nn.Module, clips: Tensor, labels: Tensor, generator: torch.Generator,
                       cfg: TeacherSampling = TeacherSampling()) -> Tensor:
    """Clips [N, 1, T, H, W] in [-1, 1] continuing the first frames of ``clips`` (CFG on the label)."""
    from rcm.samplers import sample_euler, sample_unipc, shifted_flow_times, teacher_velocity

    noise = torch.randn(clips.shape, generator=generator)
    velocity = teacher_velocity(model, labels, guidance=cfg.guidance, negative_context=null_labels(labels),
                                condition=first_frame_condition(clips))
    times = shifted_flow_times(cfg.steps, shift=cfg.shift, sigma_max=cfg.sigma_max)
    run = {"unipc": sample_unipc, "euler": sample_euler}[cfg.sampler]
    return run(velocity, noise, times).float().clamp(-1, 1)


@torch.no_grad()
def sample_i2v_student(model: nn.Module, clips: Tensor, labels: Tensor, generator: torch.Generator,
                       steps: int = 2, sigma_max: float = 80.0) -> Tensor:
    """Few-step consistency samples continuing the first frames of ``clips`` (a two-expert student
    switches expert per step by its time)."""
    from rcm.samplers import consistency_times, sample_consistency, student_denoiser

    noise = torch.randn(clips.shape, generator=generator)
    denoiser = student_denoiser(model, labels, condition=first_frame_condition(clips))
    out = sample_consistency(denoiser, noise, consistency_times(steps, sigma_max=sigma_max), generator=generator)
    return out.float().clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# the report


def i2v_metrics(out: Tensor, given: Tensor, labels: Tensor, classifier: nn.Module) -> dict:
    """given_frame_error: max |out − given| on the given frame; accuracy: the clip classifier's accuracy
    for the given clip's label (the digit kept); continuity: mean |frame 1 − frame 0| (how far the first
    generated frame jumps from the given one; real clips move 0.5–1.5 px a frame); motion: mean
    |last frame − frame 0| (a copy of the given frame scores 0)."""
    return {
        "given_frame_error": float((out[:, :, :GIVEN_FRAMES] - given[:, :, :GIVEN_FRAMES]).abs().max()),
        "accuracy": float(classifier_accuracy(classifier, out, labels)),
        "continuity": float((out[:, :, 1] - out[:, :, 0]).abs().mean()),
        "motion": float((out[:, :, -1] - out[:, :, 0]).abs().mean()),
    }


def i2v_report(teacher: nn.Module, students: dict[str, nn.Module], out_dir: Path, report: I2VReport,
               sampling: TeacherSampling, console=None) -> list[dict]:
    """Score the real clips, the teacher and each student at each step count on the same first frames and
    noise; write ``i2v_metrics.json`` and ``i2v_samples.png`` (rows: generators; 10 clips each). A student
    row adds ``vs_teacher``: the mean squared difference to the teacher's clip from the same noise and
    image over the generated frames."""
    from rich.console import Console
    from rich.table import Table

    from rcm.digits.metrics import frame_metrics, real_reference

    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = DigitClips("test", n=report.num_clips, seed=report.seed, spec=DEMO_SPEC)
    clips = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([int(data[i][1]) for i in range(len(data))])
    classifier = load_classifier()
    reference = real_reference(report.num_real, report.real_seed, DEMO_SPEC)
    seed = lambda: torch.Generator().manual_seed(report.seed)  # noqa: E731  same noise for every generator
    cfg = TeacherSampling(**{**sampling.__dict__, "steps": report.teacher_steps})
    start = time.perf_counter()
    samples = {"data": clips, f"teacher@{report.teacher_steps}": sample_i2v_teacher(teacher, clips, labels, seed(), cfg)}
    for name, student in students.items():
        for steps in report.student_steps:
            samples[f"{name}@{steps}"] = sample_i2v_student(student, clips, labels, seed(), steps, report.sigma_max)
    teacher_clips = samples[f"teacher@{report.teacher_steps}"]
    rows = []
    for name, out in samples.items():
        row = {"name": name, **i2v_metrics(out, clips, labels, classifier), **frame_metrics(out, labels, reference)}
        row["given_frame_within_bound"] = row["given_frame_error"] <= GIVEN_FRAME_BOUND
        if name not in ("data", f"teacher@{report.teacher_steps}"):
            row["vs_teacher"] = float((out - teacher_clips)[:, :, GIVEN_FRAMES:].pow(2).mean())
        rows.append(row)
    table = Table(title=f"image-to-video digits: {len(clips)} held-out first frames")
    columns = ["name", "given_frame_error", "accuracy", "continuity", "motion", "vs_teacher", "frame_accuracy",
               "switching_share", "frame_fd", "frame_diversity"]
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns])
    console.print(table)
    import numpy as np

    grid = np.concatenate([clip_grid(out[:10], nrow=10, scale=2) for out in samples.values()], axis=0)
    write_image(out_dir / "i2v_samples.png", grid)
    (out_dir / "i2v_samples_order.txt").write_text("\n".join(samples) + "\n")
    meta = {"report": asdict(report), "teacher_sampling": cfg.__dict__, "given_frame_bound": GIVEN_FRAME_BOUND,
            "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / "i2v_metrics.json").write_text(json.dumps({"rows": rows, **meta}, indent=2) + "\n")
    return rows


# --------------------------------------------------------------------------------------------
# distillation: the digits task with the first frame given


class DigitsI2VTask(DigitsTask):
    """The digits task with each batch's first frames as its condition (docs/method.md §12)."""

    def describe(self) -> str:
        return "the image-to-video digits teacher" + (" as two experts" if self.cfg.experts == "two" else "")

    def _teacher(self, device) -> nn.Module:
        teacher = load_i2v_teacher(self.cfg.teacher, device=device)
        return WanExperts(teacher, copy.deepcopy(teacher), self.cfg.boundary) if self.cfg.experts == "two" else teacher

    def build_teacher(self, device: torch.device | str | None = None) -> nn.Module:
        return self._teacher(self.run.device if device is None else device)

    def new_network(self) -> nn.Module:
        return self._teacher("cpu")

    def next_batch(self) -> tuple[Tensor, Tensor, FrameCondition]:
        x0, labels = next(self.batches)
        return x0, labels, first_frame_condition(x0)

    def write_samples(self, ema: nn.Module, iteration: int, run_dir: Path, console) -> None:
        """None during the run (a student samples from given first frames): the report at the end does."""

    def export(self, ema: nn.Module, path: Path, metadata: dict) -> None:
        save_i2v_student(ema, path, metadata)

    def report(self, teacher: nn.Module, ema: nn.Module, run_dir: Path, console) -> dict:
        if not self.cfg.report:
            return {}
        loss = self.cfg.loss
        sampling = TeacherSampling(guidance=loss.scm.guidance if loss.scm.guidance > 1 else loss.dmd.guidance)
        rows = i2v_report(teacher, {self.cfg.method: ema}, run_dir, self.cfg.i2v_report, sampling, console)
        console.print(f"samples → {run_dir}/i2v_samples.png; metrics → {run_dir}/i2v_metrics.json")
        return {"rows": rows}


def save_i2v_student(model: nn.Module, path: Path, metadata: dict) -> None:
    """One file (atomically); a two-expert student as ``<stem>.high.safetensors`` + ``<stem>.low.safetensors``
    with the boundary in both (``load_i2v_student`` reads either form)."""
    parts = {path: model} if not isinstance(model, WanExperts) else {
        path.with_suffix(".high.safetensors"): model.high_noise, path.with_suffix(".low.safetensors"): model.low_noise}
    for part, module in parts.items():
        extra = {} if len(parts) == 1 else {"boundary": str(model.boundary), "expert": part.suffixes[-2][1:]}
        save_model(module, part, {**metadata, **extra})  # atomic


def load_i2v_student(path: Path) -> nn.Module:
    """A student written by ``save_i2v_student`` (``path`` as given to it)."""
    path = Path(path)
    high, low = path.with_suffix(".high.safetensors"), path.with_suffix(".low.safetensors")
    if path.is_file() or not high.is_file():
        return load_model(path)
    from rcm.digits.model import model_metadata

    return WanExperts(load_model(high), load_model(low), float(model_metadata(high)["boundary"]))


def distill_digits_i2v(cfg: DigitsI2VDistillConfig) -> dict:
    """``rcm distill digits-i2v``: run (or resume) the I2V miniature's distillation, export, report."""
    run = start_run(cfg)
    return distill(DigitsI2VTask(cfg, run), cfg, run)
