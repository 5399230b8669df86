"""Tasks: what the distillation loop trains on, and how a finished run is reported.

`DigitsTask` is the embedded default: the shipped class-conditional digits teacher, real moving-digit
clips as x0, the null label as the CFG negative, and a report comparing teacher and students on
quality (classifier Fréchet distance), adherence (class accuracy) and diversity.

`WanTask` is Wan2.1 text-to-video: a teacher DiT file, the latents and umT5 embeddings of an `rcm synth`
dataset (or the reference's webdataset tars) as x0 and context, the stored negative-prompt embedding as
the CFG negative.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rcm.data import ClipBatches, LatentBatches, LatentDataset, clip_grid, pad_embeddings, to_unit
from rcm.demo import DEMO_SPEC, TeacherSampling, load_teacher, null_labels, sample_student, sample_teacher


@dataclass(frozen=True)
class DigitsReport:
    """What the final report samples and scores."""

    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: tuple[int, ...] = (1, 2, 4, 50)
    num_per_class: int = 20  # clips per class scored for each generator
    num_real: int = 500  # held-out real clips for FD / diversity
    sigma_max: float = 80.0
    seed: int = 0


class DigitsTask:
    """Real training clips (x0), labels as the context, the null label as the CFG negative."""

    def __init__(self, teacher_path: Path | None, batch_size: int, seed: int):
        self.teacher_path = teacher_path
        self.batches = ClipBatches("train", batch_size=batch_size, seed=seed, spec=DEMO_SPEC)

    def build_teacher(self) -> nn.Module:
        return load_teacher(self.teacher_path)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        return next(self.batches)

    def negative_context(self, labels: Tensor) -> Tensor:
        return null_labels(labels)

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])


def read_negative_embedding(path: Path) -> Tensor:
    """A negative-prompt embedding file -> ``[length, D]`` (trimmed): our ``negative.safetensors``
    ("embed") or the reference's ``neg_embed_path`` (a ``torch.save``d ``[512, D]`` or ``[1, 512, D]``)."""
    from rcm.data import trim_embedding

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--negative-embedding: no file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            embed = load_file(str(path))["embed"]
        else:
            embed = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, or not what we expect
        raise ValueError(f"--negative-embedding: cannot read {path} ({type(e).__name__}: {e})") from e
    if isinstance(embed, Tensor) and embed.ndim == 3 and embed.shape[0] == 1:
        embed = embed[0]
    if not isinstance(embed, Tensor) or embed.ndim != 2:
        raise ValueError(f"--negative-embedding: {path} must hold a [text_len, dim] tensor")
    return trim_embedding(embed)


class WanTask:
    """Wan2.1 T2V: latents and text embeddings of a dataset (``rcm.data.LatentDataset``), the negative
    prompt's embedding as the CFG negative (the dataset's, or ``negative_embedding``).

    The architecture comes from the teacher file (``config`` overrides). ``dtype``/``device``: where
    ``build_teacher`` puts the teacher. ``rank``/``world``: this process's data-parallel slot (CP ranks
    of a group pass the same one). ``max_frames``: latent frames kept (the 1.3B run: 20 of 21)."""

    def __init__(self, teacher_path: Path, data_path: Path, batch_size: int, seed: int, *, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_frames: int | None = None, config=None,
                 negative_embedding: Path | None = None, need_negative: bool = True, rank: int = 0, world: int = 1):
        from rcm.models.checkpoint import read_dit_config

        self.teacher_path, self.device, self.dtype = Path(teacher_path), device, dtype
        if not self.teacher_path.exists():
            raise FileNotFoundError(f"--teacher: no such file or folder: {teacher_path}")
        try:
            self.config = config if config is not None else read_dit_config(self.teacher_path)
        except ValueError as e:
            raise ValueError(f"--teacher: {e}") from e
        self.dataset = LatentDataset(data_path)
        c, t, h, w = self.dataset.latent_shape
        cfg = self.config
        if c != cfg.in_dim or self.dataset.text_dim != cfg.text_dim:
            raise ValueError(f"--data: latents with {c} channels and text width {self.dataset.text_dim}, the teacher "
                             f"takes {cfg.in_dim} channels and text_dim {cfg.text_dim}")
        frames = t if max_frames is None else min(t, max_frames)
        if h % cfg.patch_size[1] or w % cfg.patch_size[2] or frames % cfg.patch_size[0]:
            raise ValueError(f"--data: latent {frames}x{h}x{w} is not divisible by the patch {cfg.patch_size}")
        self.latent_shape = (c, frames, h, w)
        negative = read_negative_embedding(negative_embedding) if negative_embedding is not None else self.dataset.negative
        if negative is None and need_negative:
            raise ValueError(f"--data: {data_path} stores no negative-prompt embedding (CFG needs one): pass "
                             f"--negative-embedding, or build the dataset with `rcm synth`")
        if negative is not None and negative.shape[1] != cfg.text_dim:
            raise ValueError(f"the negative-prompt embedding has width {negative.shape[1]}, the teacher's text_dim "
                             f"is {cfg.text_dim}")
        self.negative = None if negative is None else pad_embeddings([negative], cfg.text_len).to(device)
        self.batches = LatentBatches(self.dataset, batch_size, cfg.text_len, seed=seed, max_frames=max_frames,
                                     rank=rank, world=world)

    def build_teacher(self, device: torch.device | str | None = None) -> nn.Module:
        """The teacher on ``device`` (default the task's); "meta": its structure only (headers checked)."""
        from rcm.models.checkpoint import load_dit

        try:
            return load_dit(self.teacher_path, config=self.config, dtype=self.dtype,
                            device=self.device if device is None else device)
        except ValueError as e:
            raise ValueError(f"--teacher: {e}") from e

    def next_batch(self) -> tuple[Tensor, Tensor]:
        x0, context = next(self.batches)
        return x0.to(self.device), context.to(self.device)

    def negative_context(self, context: Tensor) -> Tensor:
        if self.negative is None:
            raise ValueError("no negative-prompt embedding: CFG (guidance > 1) needs one")
        return self.negative.expand(context.shape[0], -1, -1)

    def fixed_prompts(self, n: int) -> tuple[Tensor, list[str]]:
        """The first ``n`` samples' contexts ``[n, text_len, D]`` (on the device) and prompts: what the
        periodic samples show, the same at every point of a run."""
        samples = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
        return pad_embeddings([s[1] for s in samples], self.config.text_len).to(self.device), [s[2] for s in samples]

    def state_dict(self) -> dict:
        return {"batches": self.batches.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["batches"])


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
    import imageio.v2 as imageio

    labels = torch.arange(10)
    rows = {name: gen(labels, torch.Generator().manual_seed(seed)).float().cpu() for name, gen in generators.items()}
    blocks = [_titled(clip_grid(clips, nrow=10, scale=3), name) for name, clips in rows.items()]
    gap = np.full((blocks[0].shape[0], 6), 255, dtype=np.uint8)
    png = np.concatenate([x for b in blocks for x in (b, gap)][:-1], axis=1)
    paths = {"png": out_dir / "samples.png", "gif": out_dir / "samples.gif", "mp4": out_dir / "samples.mp4"}
    imageio.imwrite(paths["png"], png)
    frames = []
    for t in range(DEMO_SPEC.frames):
        tile = torch.stack([to_unit(c[:, 0, t]) for c in rows.values()])  # [G, N, H, W]
        g_, n, h, w = tile.shape
        tile = torch.nn.functional.pad(tile, (1, 1, 1, 1), value=0.5).permute(0, 2, 1, 3).reshape(g_ * (h + 2), n * (w + 2))
        tile = tile.repeat_interleave(6, 0).repeat_interleave(6, 1)
        frames.append((tile * 255).round().to(torch.uint8).numpy())
    imageio.mimsave(paths["gif"], frames, duration=1000 / 8, loop=0)
    h, w = frames[0].shape
    writer = imageio.get_writer(paths["mp4"], fps=8, macro_block_size=16)
    for f in frames:  # MP4 players want sizes divisible by 16
        writer.append_data(np.pad(f, ((0, (-h) % 16), (0, (-w) % 16)), constant_values=128))
    writer.close()
    (out_dir / "samples_order.txt").write_text("\n".join(rows) + "\n")
    return paths


TEACHER_METRICS_CACHE = Path(__file__).parent / "assets" / "digits_teacher_metrics.json"


def _teacher_cache_key(teacher_path: Path | None, cfg, teacher_sampling: TeacherSampling, steps: int) -> str:
    """Teacher rows depend only on the teacher file, the evaluation settings and the sampler: key them so a
    run's report can reuse rows measured once (50-step CFG sampling is most of the report's time)."""
    import hashlib

    from rcm.demo import TEACHER_PATH

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
    from rcm.evaluate import EvalConfig, evaluate, print_table

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
                raise FileNotFoundError(f"--runs: {run} has no student_ema.safetensors (run `rcm distill` first)")
        if self.teacher is not None and not Path(self.teacher).is_file():
            raise FileNotFoundError(f"--teacher: no file at {self.teacher}")


def eval_runs(cfg: EvalRunsConfig) -> list[dict]:
    """Sample and score the teacher and every run's EMA student; write metrics.json and samples to --out-dir."""
    from rcm.demo import load_model

    students = {}
    for run in cfg.runs:
        meta = json.loads((Path(run) / "config.json").read_text()) if (Path(run) / "config.json").is_file() else {}
        students[meta.get("method", Path(run).name)] = load_model(Path(run) / "student_ema.safetensors")
    return digits_report(load_teacher(cfg.teacher), students, Path(cfg.out_dir), cfg.report_settings,
                         TeacherSampling(guidance=cfg.guidance), teacher_path=cfg.teacher,
                         reuse_teacher_rows=cfg.reuse_teacher_rows)
