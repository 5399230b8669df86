"""`rcm distill` (digits): the embedded default as a task of the training engine.

The shipped class-conditional digits teacher, real moving-digit clips as x0, labels as the context, the
null label as the CFG negative; at the end a report scoring teacher and student frame by frame (per-frame
accuracy, digit switching, shape and motion consistency, stray ink, frame FD, diversity:
``rcm.digits.evaluate``, ``rcm.digits.metrics``). ``--device``: clips are made on the CPU, batches move.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rcm.digits import presets
from rcm.digits.config import DigitsDistillConfig
from rcm.digits.data import ClipBatches, clip_grid
from rcm.digits.evaluate import digits_report
from rcm.digits.model import (DEMO_SPEC, TeacherSampling, architecture_metadata, load_teacher, null_labels, sample_student,
                              save_model)
from rcm.media import write_image
from rcm.sample import resolve_device
from rcm.train import Run, distill, is_rank0, start_run


class DigitsTask:
    """The engine's task for the digits demo (see the module docstring)."""

    dtype = torch.float32

    def __init__(self, cfg: DigitsDistillConfig, run: Run):
        self.cfg, self.run = cfg, run
        self.batches = ClipBatches("train", batch_size=cfg.batch_size, seed=run.seed, spec=DEMO_SPEC)

    def describe(self) -> str:
        return "the digits teacher"

    def build_teacher(self, device: torch.device | str | None = None) -> nn.Module:
        return load_teacher(self.cfg.teacher, device=self.run.device if device is None else device)

    def new_network(self) -> nn.Module:
        return load_teacher(self.cfg.teacher, device="cpu")  # its weights are overwritten by the gathered ones

    def next_batch(self) -> tuple[Tensor, Tensor]:
        clips, labels = next(self.batches)
        return clips.to(self.run.device, non_blocking=True), labels.to(self.run.device, non_blocking=True)

    def negative_context(self, labels: Tensor) -> Tensor:
        return null_labels(labels)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])

    def write_samples(self, ema: nn.Module, iteration: int, run_dir: Path, console) -> dict:
        """The EMA student's clip of each digit (fixed noise) at each reported step count, a clip per row and
        frames left to right: ``samples/iter_<iteration>_<n>step.png`` (rank 0), and the images for the
        run's log sinks. The report at the end scores every generator."""
        images = {}
        for steps in presets.STUDENT_STEPS:
            clips = sample_student(ema, torch.arange(10), torch.Generator().manual_seed(0), steps=steps)
            images[f"{steps}step"] = clip_grid(clips, scale=2)
        if is_rank0():
            for name, image in images.items():
                write_image(run_dir / "samples" / f"iter_{iteration:08d}_{name}.png", image)
        return {"iteration": iteration, "images": images}

    def network_metadata(self, network: nn.Module) -> dict[str, str]:
        # one class-conditioned DiT (two-expert I2V students are exported in parts by their own task)
        return architecture_metadata(network) if hasattr(network, "num_classes") else {}

    def export(self, ema: nn.Module, path: Path, metadata: dict) -> None:
        save_model(ema, path, metadata)  # atomic: a crash mid-export leaves the previous export (or none)

    def card(self, summary: dict) -> dict:
        """The model card's facts (``rcm.checkpoint.card``): the teacher, the sampler settings the report
        evaluates the student with, and its rows of the report (``summary["rows"]``) as metrics."""
        from rcm.digits.model import TEACHER_PATH

        rep, method = self.cfg.report_settings, self.cfg.method
        mids = {n: rep.student_mid_times(n) for n in presets.STUDENT_MID_TIMES  # only complete sets of given ones
                if rep.mid_times is None or len(rep.mid_times) >= n - 1}
        metrics = {r["name"]: r for r in summary.get("rows", []) if str(r.get("name", "")).startswith(f"{method}@")}
        return {"family": "digits", "teacher": str(self.cfg.teacher or TEACHER_PATH), "metrics": metrics,
                "sampling": {"steps": max(rep.student_steps, default=4), "sigma_max": rep.sigma_max,
                             "mid_times": mids, "evaluated_steps": list(rep.student_steps)}}  # fmt: skip

    def report(self, teacher: nn.Module, ema: nn.Module, run_dir: Path, console) -> dict:
        if not self.cfg.report:
            return {}
        loss = self.cfg.loss
        sampling = TeacherSampling(guidance=loss.scm.guidance if loss.scm.guidance > 1 else loss.dmd.guidance)
        teacher, ema = teacher.to(self.run.device), ema.to(self.run.device)
        rows = digits_report(teacher, {self.cfg.method: ema}, run_dir, self.cfg.report_settings, sampling,
                             console=console, teacher_path=self.cfg.teacher)
        console.print(f"samples → {run_dir}/samples.png, samples.gif, samples.mp4; metrics → {run_dir}/metrics.json")
        return {"rows": rows}


def distill_digits(cfg: DigitsDistillConfig) -> dict:
    """`rcm distill` / `rcm distill digits`: run (or resume) the demo's distillation, export, report."""
    run = start_run(cfg, device=resolve_device(cfg.device))
    return distill(DigitsTask(cfg, run), cfg, run)
