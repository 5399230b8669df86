"""Quality and diversity of generated digit clips, measured with a small classifier of our own.

Metrics for a set of generated clips ``[N, 1, T, H, W]`` in [-1, 1] with the labels they were
asked for:
(a) ``accuracy``: fraction the classifier assigns to the requested class (adherence);
(b) ``fd``: Fréchet distance between the classifier's penultimate features of the generated clips
    and of held-out real clips (quality; lower is better), in float64 with an eigh-based matrix sqrt;
(c) ``diversity``: mean pairwise feature distance within each class, averaged over classes,
    divided by the same on the held-out real clips (1.0 = as diverse as the data, → 0 = collapse);
(d) ``sec_per_sample``: wall time of the generator call divided by the number of clips.

The classifier: ``rcm.digits.classifier``. Here also the distill report (samples and the table of
teacher and students) and `rcm eval`, which scores finished runs side by side.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rcm import PathArgumentError
import torch.nn as nn

from rcm.digits import presets
from rcm.digits.classifier import DigitClassifier, load_classifier
from rcm.digits.data import NUM_CLASSES, ClipSpec, DigitClips, clip_grid, sample_clips
from rcm.digits.model import (
    DEMO_SPEC,
    TEACHER_PATH,
    TeacherSampling,
    load_model,
    load_teacher,
    sample_student,
    sample_teacher,
)
from rcm.media import tile_clips, write_image, write_video

# A generator maps requested labels [n] and a torch.Generator to clips [n, 1, T, H, W] in [-1, 1].
ClipGenerator = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# --------------------------------------------------------------------------------------------
# metrics


@torch.no_grad()
def clip_features(model: DigitClassifier, clips: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, D] float64, logits [N, classes])`` of clips ``[N, 1, T, H, W]``."""
    feats, logits = [], []
    for i in range(0, len(clips), batch_size):
        f = model.features(clips[i : i + batch_size].float())
        feats.append(f.double())
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``:
    ``|μa−μb|² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½`` (float64, symmetric eigh square roots)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    s = _sqrtm_psd(cov_a)
    m = s @ cov_b @ s
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_covmean
    return max(fd.item(), 0.0)


def mean_intra_class_distance(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise Euclidean feature distance within each class, averaged over the classes that
    have at least two samples."""
    per_class = []
    for c in labels.unique():
        f = feats[labels == c].double()
        if len(f) < 2:
            continue
        d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
        n = len(f)
        per_class.append(d.sum() / (n * (n - 1)))
    if not per_class:
        raise ValueError("diversity needs at least one class with two or more samples")
    return torch.stack(per_class).mean().item()


@dataclass
class RealReference:
    """Classifier features of held-out real clips, the yardstick for FD and diversity."""

    feats: torch.Tensor
    labels: torch.Tensor
    diversity: float

    @classmethod
    def from_clips(cls, model: DigitClassifier, clips: torch.Tensor, labels: torch.Tensor) -> "RealReference":
        feats, _ = clip_features(model, clips)
        return cls(feats, labels, mean_intra_class_distance(feats, labels))


def clip_metrics(model: DigitClassifier, clips: torch.Tensor, labels: torch.Tensor, reference: RealReference) -> dict:
    """accuracy, fd, diversity of generated ``clips`` that were asked to show ``labels``."""
    if clips.ndim != 5 or clips.shape[1] != 1:
        raise ValueError(f"clips must be [N, 1, T, H, W], got {tuple(clips.shape)}")
    if not torch.isfinite(clips).all():
        raise ValueError("generated clips contain NaN or inf")
    feats, logits = clip_features(model, clips)
    return {
        "accuracy": (logits.argmax(-1) == labels).double().mean().item(),
        "fd": frechet_distance(feats, reference.feats),
        "diversity": mean_intra_class_distance(feats, labels) / reference.diversity,
    }


# --------------------------------------------------------------------------------------------
# evaluating named generators


@dataclass
class EvalConfig:
    """How generators are evaluated (the same labels and noise seed for every generator)."""

    num_per_class: int = 50
    batch_size: int = 100
    seed: int = 0
    num_real: int = 1000  # held-out real clips (test split) for FD and diversity
    real_seed: int = 1234
    classifier: Path | None = None  # None: the shipped classifier
    spec: ClipSpec = field(default_factory=ClipSpec)


def data_generator(split: str = "train", spec: ClipSpec = ClipSpec()) -> ClipGenerator:
    """Real clips as a 'generator' (a reference row: what real data scores)."""
    return lambda labels, g: sample_clips(split, len(labels), g, spec, labels)[0]


def evaluate(generators: dict[str, ClipGenerator], cfg: EvalConfig = EvalConfig(), console=None,
             show: bool = True) -> list[dict]:
    """Run every generator on the same class-balanced labels with the same seed, score its clips,
    print a rich table (`show`) and return one row (dict) per generator."""
    model = load_classifier(cfg.classifier)
    real = DigitClips("test", cfg.num_real, seed=cfg.real_seed, spec=cfg.spec)
    reference = RealReference.from_clips(model, real.clips, real.labels)
    labels = torch.arange(cfg.num_per_class * NUM_CLASSES) % NUM_CLASSES
    rows = []
    for name, gen in generators.items():
        g = torch.Generator().manual_seed(cfg.seed)
        clips, seconds = [], 0.0
        for i in range(0, len(labels), cfg.batch_size):
            t0 = time.perf_counter()
            out = gen(labels[i : i + cfg.batch_size], g)
            seconds += time.perf_counter() - t0
            clips.append(out.detach().float().cpu())
        clips = torch.cat(clips)
        rows.append({"name": name, **clip_metrics(model, clips, labels, reference), "sec_per_sample": seconds / len(labels), "n": len(labels)})
    if show:
        print_table(rows, console=console)
    return rows


def print_table(rows: list[dict], title: str = "digit clips: quality and diversity", console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col, just in [("generator", "left"), ("accuracy ↑", "right"), ("FD ↓", "right"), ("diversity (1=data)", "right"), ("s/sample", "right")]:
        table.add_column(col, justify=just)
    for r in rows:
        table.add_row(r["name"], f"{r['accuracy']:.3f}", f"{r['fd']:.2f}", f"{r['diversity']:.3f}", f"{r['sec_per_sample']:.4f}")
    (console or Console()).print(table)


# --------------------------------------------------------------------------------------------
# the distill report and `rcm eval`


@dataclass(frozen=True)
class DigitsReport:
    """What the final report samples and scores."""

    student_steps: tuple[int, ...] = presets.STUDENT_STEPS
    teacher_steps: tuple[int, ...] = (1, 2, 4, presets.TEACHER_STEPS)
    num_per_class: int = 20  # clips per class scored for each generator
    num_real: int = 500  # held-out real clips for FD / diversity
    sigma_max: float = presets.STUDENT_SIGMA_MAX
    seed: int = 0


def digits_generators(teacher: nn.Module, students: dict[str, nn.Module], report: DigitsReport,
                      teacher_sampling: TeacherSampling) -> dict:
    """Named `(labels, generator) -> clips` callables: the teacher at each step count, each student at each."""
    gens = {}
    for steps in report.teacher_steps:
        cfg = TeacherSampling(**{**teacher_sampling.__dict__, "steps": steps})
        gens[f"teacher@{steps}"] = (lambda c: lambda labels, g: sample_teacher(teacher, labels, g, c))(cfg)
    for name, student in students.items():
        for steps in report.student_steps:
            gens[f"{name}@{steps}"] = (lambda s, n: lambda labels, g: sample_student(
                s, labels, g, steps=n, sigma_max=report.sigma_max))(student, steps)
    return gens


def _titled(image: np.ndarray, title: str, height: int = 14) -> np.ndarray:
    """`image` (uint8 [H, W]) with a white title strip above it."""
    from PIL import Image, ImageDraw

    strip = Image.new("L", (image.shape[1], height), 255)
    ImageDraw.Draw(strip).text((2, 1), title, fill=0)
    return np.concatenate([np.asarray(strip), image])


def write_samples(generators: dict, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """samples.png: one block per generator (titled), a row per digit 0-9, frames left to right; and an
    animated samples.gif / samples.mp4 of the same clips (rows: generators, columns: digits)."""
    labels = torch.arange(NUM_CLASSES)
    rows = {name: gen(labels, torch.Generator().manual_seed(seed)).float().cpu() for name, gen in generators.items()}
    blocks = [_titled(clip_grid(clips, nrow=NUM_CLASSES, scale=3), name) for name, clips in rows.items()]
    gap = np.full((blocks[0].shape[0], 6), 255, dtype=np.uint8)
    paths = {"png": out_dir / "samples.png", "gif": out_dir / "samples.gif", "mp4": out_dir / "samples.mp4"}
    write_image(paths["png"], np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=1))
    # a row of clips per generator, 6x pixels, mid-grey borders, padded to multiples of 16
    frames = torch.cat([tile_clips(clips, scale=6, pad=1) for clips in rows.values()], dim=1)
    fps = presets.FPS
    write_video(paths["gif"], frames, fps=fps)
    write_video(paths["mp4"], frames, fps=fps)
    (out_dir / "samples_order.txt").write_text("\n".join(rows) + "\n")
    return paths


TEACHER_METRICS_CACHE = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher_metrics.json"


def _teacher_cache_key(teacher_path: Path | None, cfg, teacher_sampling: TeacherSampling, steps: int) -> str:
    """Teacher rows depend only on the teacher file, the evaluation settings and the sampler: key them so a
    run's report can reuse rows measured once (50-step CFG sampling is most of the report's time)."""
    import hashlib

    digest = hashlib.sha256(Path(teacher_path or TEACHER_PATH).read_bytes()).hexdigest()[:16]
    settings = {**teacher_sampling.__dict__, "steps": steps}
    return json.dumps({"teacher": digest, "eval": {k: str(v) for k, v in cfg.__dict__.items()}, "sampling": settings},
                      sort_keys=True)


def digits_report(teacher: nn.Module, students: dict[str, nn.Module], out_dir: Path, report: DigitsReport,
                  teacher_sampling: TeacherSampling, console=None, teacher_path: Path | None = None,
                  reuse_teacher_rows: bool = True) -> list[dict]:
    """Sample, score and write `metrics.json`, `samples.png`, `samples.gif`, `samples.mp4`; print the table.

    Teacher rows are read from `rcm/assets/digits_teacher_metrics.json` when it holds a row measured with the
    same teacher file, evaluation settings and sampler (`reuse_teacher_rows`); `rcm eval` recomputes them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gens = digits_generators(teacher, students, report, teacher_sampling)
    shown = {k: v for k, v in gens.items() if not k.startswith("teacher@") or k in ("teacher@1", "teacher@50")}
    write_samples(shown, out_dir, seed=report.seed)
    cfg = EvalConfig(num_per_class=report.num_per_class, num_real=report.num_real, seed=report.seed, spec=DEMO_SPEC)
    cache = json.loads(TEACHER_METRICS_CACHE.read_text()) if TEACHER_METRICS_CACHE.is_file() else {}
    keys = {f"teacher@{n}": _teacher_cache_key(teacher_path, cfg, teacher_sampling, n) for n in report.teacher_steps}
    cached = {name: {**cache[key], "cached": True} for name, key in keys.items() if reuse_teacher_rows and key in cache}
    start = time.perf_counter()
    fresh = evaluate({k: v for k, v in gens.items() if k not in cached}, cfg, console=console, show=False)
    by_name = {**cached, **{r["name"]: r for r in fresh}}
    rows = [by_name[name] for name in gens]
    print_table(rows, console=console)
    if cached:
        from rich.console import Console

        (console or Console()).print(f"({', '.join(cached)}: measured earlier by `rcm eval` with this teacher file and "
                                     f"these settings, read from {TEACHER_METRICS_CACHE.name})")
    if not reuse_teacher_rows:  # a full evaluation refreshes the shipped cache of teacher rows
        cache.update({keys[r["name"]]: {k: v for k, v in r.items() if k != "cached"} for r in fresh if r["name"] in keys})
        if TEACHER_METRICS_CACHE.parent.is_dir():
            TEACHER_METRICS_CACHE.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
    meta = {"eval_seconds": round(time.perf_counter() - start, 1), "eval": cfg.__dict__ | {"spec": str(cfg.spec)},
            "report": report.__dict__, "teacher_sampling": teacher_sampling.__dict__}
    (out_dir / "metrics.json").write_text(json.dumps({"rows": rows, **meta}, indent=2, default=str) + "\n")
    return rows


@dataclass
class EvalRunsConfig:
    """Score the teacher and the students of finished `rcm distill` runs side by side.

    The comparison table of the README: `rcm distill --method scm; rcm distill --method dmd2; rcm distill;
    rcm eval` (each run resumes if it already exists).
    """

    runs: tuple[Path, ...] = (Path("runs/digits-scm"), Path("runs/digits-dmd2"), Path("runs/digits-rcm"))
    teacher: Path | None = None  # None: the shipped teacher
    out_dir: Path = Path("runs/eval")
    guidance: float = TeacherSampling().guidance  # the teacher's CFG weight, as the demo distills with
    report_settings: DigitsReport = field(default_factory=DigitsReport)
    reuse_teacher_rows: bool = False  # False: sample the teacher afresh and refresh the shipped teacher rows

    def __post_init__(self):
        for run in self.runs:
            if not (Path(run) / "student_ema.safetensors").is_file():
                raise PathArgumentError("runs", f"{run} has no student_ema.safetensors (run `rcm distill` first)")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise PathArgumentError("teacher", f"no file at {self.teacher}")


def eval_runs(cfg: EvalRunsConfig) -> list[dict]:
    """Sample and score the teacher and every run's EMA student; write metrics.json and samples to --out-dir."""
    students = {}
    for run in cfg.runs:
        meta = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").is_file() else {}
        students[meta.get("method", Path(run).name)] = load_model(Path(run) / "student_ema.safetensors")
    return digits_report(load_teacher(cfg.teacher), students, Path(cfg.out_dir), cfg.report_settings,
                         TeacherSampling(guidance=cfg.guidance), teacher_path=cfg.teacher,
                         reuse_teacher_rows=cfg.reuse_teacher_rows)
