"""Scoring generated digit clips: `rcm eval`, the distill report, and the sampling of named generators.

Every generator is run on the same class-balanced labels with the same noise seed and scored with the
per-frame metrics of ``rcm.digits.metrics`` (per-frame accuracy, digit-switching share, shape change,
motion residual and speed ratio, stray ink, frame FD, frame diversity; its docstring has the table of what
each means and what real clips score), plus ``sec_per_sample`` (generator wall time per clip).

The older clip-pooled scores (``clip_metrics``: one classifier reading over the whole clip, FD of pooled
features) stay for comparison only (``scripts/digits_metrics_table.py``): pooling hides a digit that
changes within a clip and barely sees speckle, so the report no longer shows them.

Teacher rows are cached (sampling the teacher at 50 steps with CFG is most of a report's time): read from
the user cache (``$XDG_CACHE_HOME/rcm`` or ``~/.cache/rcm``) or the shipped read-only copy
``rcm/assets/digits_teacher_metrics.json``, written only to the user cache, never inside the package.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rcm import ConfigError, PathArgumentError, use_threads
from rcm.digits.config import DigitsReport, EvalConfig, EvalRunsConfig
from rcm.checkpoint.atomic import atomic_write_bytes
import torch.nn as nn

from rcm.digits import presets
from rcm.digits.classifier import DigitClassifier
from rcm.digits.data import NUM_CLASSES, ClipSpec, clip_grid, sample_clips
from rcm.digits.model import (
    DEMO_SPEC,
    TEACHER_PATH,
    TeacherSampling,
    load_model,
    load_teacher,
    sample_student,
    sample_teacher,
)
from rcm.digits.metrics import frechet_distance, frame_metrics, real_reference
from rcm.media import tile_clips, write_image, write_video
from rcm.sample import resolve_device

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


def data_generator(split: str = "train", spec: ClipSpec = ClipSpec()) -> ClipGenerator:
    """Real clips as a 'generator' (a reference row: what real data scores)."""
    return lambda labels, g: sample_clips(split, len(labels), g, spec, labels)[0]


def evaluate(generators: dict[str, ClipGenerator], cfg: EvalConfig = EvalConfig(), console=None,
             show: bool = True) -> list[dict]:
    """Run every generator on the same class-balanced labels with the same seed, score its clips with every
    per-frame metric, print a rich table (`show`) and return one row (dict) per generator."""
    reference = real_reference(cfg.num_real, cfg.real_seed, cfg.spec, cfg.classifier)
    labels = torch.arange(cfg.num_per_class * NUM_CLASSES) % NUM_CLASSES
    rows = []
    for name, gen in generators.items():
        g = torch.Generator().manual_seed(cfg.seed)
        clips, seconds = [], 0.0
        for i in range(0, len(labels), cfg.batch_size):
            t0 = time.perf_counter()
            out = gen(labels[i : i + cfg.batch_size], g).detach().float().cpu()  # .cpu() waits for the device
            seconds += time.perf_counter() - t0
            clips.append(out)
        clips = torch.cat(clips)
        rows.append({"name": name, **frame_metrics(clips, labels, reference),
                     "sec_per_sample": seconds / len(labels), "n": len(labels)})
    if show:
        print_table(rows, console=console)
    return rows


# (row key, column title, format): arrows say which way is better, →1 means "as real clips"
COLUMNS = (("frame_accuracy", "frame acc ↑", ".3f"), ("switching_share", "switching ↓", ".3f"),
           ("shape_change", "shape Δ ↓", ".3f"), ("motion_residual", "motion res ↓", ".3f"),
           ("speed_ratio", "speed →1", ".2f"), ("stray_ink", "stray ink ↓", ".3f"), ("frame_fd", "frame FD ↓", ".2f"),
           ("frame_diversity", "diversity →1", ".3f"), ("sec_per_sample", "s/sample", ".4f"))


def print_table(rows: list[dict], title: str = "digit clips, scored frame by frame", console=None) -> None:
    """The rows as a rich table, never squeezed into ellipses (wider than the terminal if it must)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("generator", justify="left", no_wrap=True)
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["name"], *(format(r[key], fmt) for key, _, fmt in COLUMNS))
    console = console or Console()
    if console.width < 140:  # a narrow terminal (or a pipe, 80 columns): print wider, let it wrap
        console = Console(width=140, file=console.file, quiet=console.quiet, force_terminal=console.is_terminal)
    console.print(table)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table (the README's and docs/study.md's tables)."""
    lines = ["| generator | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['name']} | " + " | ".join(format(r[k], f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# the distill report and `rcm eval`


def digits_generators(teacher: nn.Module, students: dict[str, nn.Module], report: DigitsReport,
                      teacher_sampling: TeacherSampling) -> dict:
    """Named `(labels, generator) -> clips` callables: the teacher at each step count, each student at each."""
    gens = {}
    for steps in report.teacher_steps:
        cfg = TeacherSampling(**{**teacher_sampling.__dict__, "steps": steps})
        gens[f"teacher@{steps}"] = (lambda c: lambda labels, g: sample_teacher(teacher, labels, g, c))(cfg)
    for name, student in students.items():
        for steps in report.student_steps:
            gens[f"{name}@{steps}"] = (lambda s, n, m: lambda labels, g: sample_student(
                s, labels, g, steps=n, sigma_max=report.sigma_max, mid_times=m))(student, steps,
                                                                                  report.student_mid_times(steps))
    return gens


def _titled(image: np.ndarray, title: str, height: int = 14) -> np.ndarray:
    """`image` (uint8 [H, W]) with a white title strip above it."""
    from PIL import Image, ImageDraw

    strip = Image.new("L", (image.shape[1], height), 255)
    ImageDraw.Draw(strip).text((2, 1), title, fill=0)
    return np.concatenate([np.asarray(strip), image])


def write_samples(generators: dict, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """samples.png: one block per generator (titled), a row per digit 0-9, frames left to right; and an
    animated samples.gif / samples.mp4 of the same clips (rows: generators, each titled; columns: digits)."""
    labels = torch.arange(NUM_CLASSES)
    rows = {name: gen(labels, torch.Generator().manual_seed(seed)).float().cpu() for name, gen in generators.items()}
    blocks = [_titled(clip_grid(clips, nrow=NUM_CLASSES, scale=3), name) for name, clips in rows.items()]
    gap = np.full((blocks[0].shape[0], 6), 255, dtype=np.uint8)
    paths = {"png": out_dir / "samples.png", "gif": out_dir / "samples.gif", "mp4": out_dir / "samples.mp4"}
    write_image(paths["png"], np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=1))
    # a row of clips per generator, 6x pixels, mid-grey borders, padded to multiples of 16, under a 16-pixel strip
    # naming the generator (in every frame)
    frames = np.concatenate([np.stack([_titled(frame, name, height=16) for frame in tile_clips(clips, scale=6, pad=1).numpy()])
                             for name, clips in rows.items()], axis=1)
    fps = presets.FPS
    write_video(paths["gif"], frames, fps=fps)
    write_video(paths["mp4"], frames, fps=fps)
    (out_dir / "samples_order.txt").write_text("\n".join(rows) + "\n")
    return paths


SHIPPED_TEACHER_ROWS = Path(__file__).resolve().parents[1] / "assets" / "digits_teacher_metrics.json"  # read-only


def teacher_rows_cache() -> Path:
    """In the user cache (``$XDG_CACHE_HOME/rcm`` or ``~/.cache/rcm``), never the package."""
    from rcm.checkpoint.digest import user_cache_dir

    return user_cache_dir() / "digits_teacher_metrics.json"


def _teacher_cache_key(teacher_path: Path | None, cfg: EvalConfig, teacher_sampling: TeacherSampling, steps: int) -> str:
    """Teacher rows depend only on the teacher file, the evaluation settings, the frame classifier and the
    sampler: key them so a run's report can reuse rows measured once."""
    import hashlib

    from rcm.digits.metrics import FRAME_CLASSIFIER_PATH

    def digest(path: Path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

    settings = {**teacher_sampling.__dict__, "steps": steps}
    return json.dumps({"teacher": digest(teacher_path or TEACHER_PATH),
                       "frame_classifier": digest(cfg.classifier or FRAME_CLASSIFIER_PATH),
                       "eval": {k: str(v) for k, v in cfg.__dict__.items() if k != "batch_size"}, "sampling": settings},
                      sort_keys=True)


def _read_rows(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # a damaged cache is only a cache: measure again
        return {}


def _write_rows(path: Path, rows: dict) -> None:
    """Merge ``rows`` into the cache at ``path`` (atomically: concurrent reports may write at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**_read_rows(path), **rows}
    atomic_write_bytes(path, (json.dumps(merged, indent=1, sort_keys=True) + "\n").encode())


def digits_report(teacher: nn.Module, students: dict[str, nn.Module], out_dir: Path, report: DigitsReport,
                  teacher_sampling: TeacherSampling, console=None, teacher_path: Path | None = None,
                  reuse_teacher_rows: bool = True, write_media: bool = True) -> list[dict]:
    """Sample, score and write `metrics.json` (and `samples.png`, `.gif`, `.mp4` with ``write_media``); print the
    table and write it as `metrics.md`.

    Teacher rows measured with the same teacher file, evaluation settings, frame classifier and sampler are
    read from the user cache or the shipped copy (`reuse_teacher_rows`); rows measured here go to the user
    cache (``teacher_rows_cache()``). `rcm eval` measures them afresh by default."""
    from rich.console import Console

    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    gens = digits_generators(teacher, students, report, teacher_sampling)
    if write_media:
        shown = {k: v for k, v in gens.items() if not k.startswith("teacher@") or k in ("teacher@1", "teacher@50")}
        write_samples(shown, out_dir, seed=report.seed)
    cfg = EvalConfig(num_per_class=report.num_per_class, num_real=report.num_real, seed=report.seed, spec=DEMO_SPEC)
    keys = {f"teacher@{n}": _teacher_cache_key(teacher_path, cfg, teacher_sampling, n) for n in report.teacher_steps}
    known = {**_read_rows(SHIPPED_TEACHER_ROWS), **_read_rows(teacher_rows_cache())} if reuse_teacher_rows else {}
    cached = {name: {**known[key], "cached": True} for name, key in keys.items() if key in known}
    start = time.perf_counter()
    fresh = evaluate({k: v for k, v in gens.items() if k not in cached}, cfg, console=console, show=False)
    by_name = {**cached, **{r["name"]: r for r in fresh}}
    rows = [by_name[name] for name in gens]
    print_table(rows, console=console)
    if cached:
        console.print(f"({', '.join(cached)}: measured earlier with this teacher file and these settings, read from "
                      f"the cache of teacher rows)")
    measured = {keys[r["name"]]: r for r in fresh if r["name"] in keys}
    if measured:
        _write_rows(teacher_rows_cache(), measured)
    meta = {"eval_seconds": round(time.perf_counter() - start, 1), "eval": cfg.__dict__ | {"spec": str(cfg.spec)},
            "report": report.__dict__, "teacher_sampling": teacher_sampling.__dict__,
            "student_mid_times": {s: report.student_mid_times(s) for s in report.student_steps}}
    (out_dir / "metrics.json").write_text(json.dumps({"rows": rows, **meta}, indent=2, default=str) + "\n")
    (out_dir / "metrics.md").write_text(markdown_table(rows))
    return rows


def distill_command(run: Path) -> str:
    """The `rcm distill` command that writes the run folder ``run`` (its method read from the folder's name,
    as `rcm distill` names runs/digits-<method>)."""
    run = Path(run)
    method = next((m for m in ("rcm", "scm", "dmd2") if run.name.endswith(f"-{m}")), "rcm")
    words = ["rcm distill"] + ([f"--method {method}"] if method != "rcm" else [])
    if run != Path("runs") / f"digits-{method}":
        words.append(f"--out-dir {run}")
    return " ".join(words)


def run_method(run: Path) -> str:
    """The method a finished run used (its ``config.json``; the folder's name if it has none); a file that is
    not a JSON object with a string ``method`` is an error naming it."""
    path = Path(run) / "config.json"
    if not path.is_file():
        return Path(run).name
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError("runs", f"{path} is not readable JSON ({type(e).__name__}: {' '.join(str(e).split())[:80]})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("method", ""), str):
        raise ConfigError("runs", f"{path} is not an rcm run's config (a JSON object with a string 'method')")
    return meta.get("method") or Path(run).name


def student_file_name(path: Path) -> str:
    """The table name of a digits student file (the method in its metadata, else the file's name without
    .safetensors); a ConfigError on ``runs`` for a file that is not one. Reads the header only."""
    from rcm.digits.model import model_metadata

    path = Path(path)
    if not path.is_file():
        raise PathArgumentError("runs", f"no file at {path}")
    if path.suffix != ".safetensors":
        raise ConfigError("runs", f"{path}: give a run folder or a digits student .safetensors file")
    try:
        meta = model_metadata(path)
    except Exception as e:  # truncated or not safetensors: safetensors raises its own error types
        raise ConfigError("runs", f"{path} is not a readable safetensors file ({type(e).__name__})") from e
    if "wan_config" not in meta or "num_classes" not in meta:
        raise ConfigError("runs", f"{path} is not a digits student: its metadata holds no digits architecture "
                                  f"(wan_config and num_classes), e.g. a Wan DiT's export")
    kind = meta.get("kind") or ("teacher" if "recipe" in meta else "student")  # `rcm train-teacher` records its recipe
    if kind != "student":
        raise ConfigError("runs", f"{path} is a digits {kind}, not a student")
    return meta.get("method") or path.stem


def students(runs: tuple[Path, ...]) -> dict[str, Path]:
    """{table name: student file} of ``--runs`` entries (run folders or student files); names that two entries
    share are told apart by the entry's path."""
    found = []
    for run in runs:
        run = Path(run)
        if run.is_dir() or (not run.is_file() and run.suffix != ".safetensors"):  # a run folder (a missing one: its command)
            if not (run / "student_ema.safetensors").is_file():
                raise PathArgumentError("runs", f"{run} has no student_ema.safetensors (run `{distill_command(run)}` first)")
            found.append((run_method(run), run / "student_ema.safetensors", run))
        else:
            found.append((student_file_name(run), run, run))
    names = [name for name, _, _ in found]
    return {(name if names.count(name) == 1 else f"{name} ({entry})"): file for name, file, entry in found}


def eval_runs(cfg: EvalRunsConfig) -> list[dict]:
    """Sample and score the teacher and every run's EMA student (or student file); write metrics.json and samples to --out-dir
    (claimed for this process first: see ``rcm.checkpoint.run_folder``)."""
    from rcm.checkpoint.run_folder import claimed_folder

    students(cfg.runs)  # a missing student or a damaged config.json is named now, not after the teacher was sampled
    with claimed_folder(cfg.out_dir, "eval", legacy=("metrics.json",)):
        return _eval_runs(cfg)


def _eval_runs(cfg: EvalRunsConfig) -> list[dict]:
    use_threads("threads", cfg.threads)
    device = resolve_device(cfg.device)
    models = {name: load_model(file, device=device) for name, file in students(cfg.runs).items()}
    return digits_report(load_teacher(cfg.teacher, device=device), models, Path(cfg.out_dir), cfg.report_settings,
                         TeacherSampling(guidance=cfg.guidance), teacher_path=cfg.teacher,
                         reuse_teacher_rows=cfg.reuse_teacher_rows)
