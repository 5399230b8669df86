"""Quality and diversity of generated digit clips, measured with a small classifier of our own.

Metrics for a set of generated clips ``[N, 1, T, H, W]`` in [-1, 1] with the labels they were
asked for:
(a) ``accuracy``: fraction the classifier assigns to the requested class (adherence);
(b) ``fd``: Fréchet distance between the classifier's penultimate features of the generated clips
    and of held-out real clips (quality; lower is better), in float64 with an eigh-based matrix sqrt;
(c) ``diversity``: mean pairwise feature distance within each class, averaged over classes,
    divided by the same on the held-out real clips (1.0 = as diverse as the data, → 0 = collapse);
(d) ``sec_per_sample``: wall time of the generator call divided by the number of clips.

The classifier (``DigitClassifier``, a 3-D conv net) is trained by ``train_classifier`` on the
train split and shipped as ``rcm/assets/digits_classifier.safetensors``; see
``rcm/assets/README.md`` for the exact command.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcm.data import NUM_CLASSES, ClipBatches, ClipSpec, DigitClips, sample_clips

ASSETS = Path(__file__).parent / "assets"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"

# A generator maps requested labels [n] and a torch.Generator to clips [n, 1, T, H, W] in [-1, 1].
ClipGenerator = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


# --------------------------------------------------------------------------------------------
# the classifier


class DigitClassifier(nn.Module):
    """3-D conv net over ``[N, 1, T, H, W]``: conv stack → global average pool → features → logits."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.convs = nn.Sequential(
            nn.Conv3d(1, w, 3, padding=1),
            nn.GELU(),
            nn.Conv3d(w, 2 * w, 3, stride=(1, 2, 2), padding=1),
            nn.GELU(),
            nn.Conv3d(2 * w, 4 * w, 3, stride=(2, 2, 2), padding=1),
            nn.GELU(),
        )
        self.proj = nn.Linear(4 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, feature_dim]``."""
        h = self.convs(x).mean(dim=(2, 3, 4))
        return F.gelu(self.proj(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def save_classifier(model: DigitClassifier, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.config), **{k: str(v) for k, v in (metadata or {}).items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (or one saved by ``train_classifier``), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_PATH
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = DigitClassifier(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


@dataclass
class TrainClassifierConfig:
    """Recipe of the shipped evaluator classifier."""

    out: Path = Path("runs/classifier.safetensors")  # the shipped copy: rcm/assets/digits_classifier.safetensors
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    width: int = 32
    feature_dim: int = 64
    spec: ClipSpec = field(default_factory=ClipSpec)
    num_test: int = 1000  # held-out clips for the accuracy reported at the end
    log_every: int = 100

    def __post_init__(self):
        for name in ("steps", "batch_size", "width", "feature_dim", "num_test", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.weight_decay >= 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, clips: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    pred = torch.cat([model(clips[i : i + batch_size]).argmax(-1) for i in range(0, len(clips), batch_size)])
    return (pred == labels).float().mean().item()


def train_classifier(cfg: TrainClassifierConfig) -> tuple[DigitClassifier, float]:
    """Train the classifier on fresh train-split clips; save it; return it and its held-out accuracy."""
    from rich.progress import Progress

    torch.manual_seed(cfg.seed)
    model = DigitClassifier(cfg.width, cfg.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    batches = ClipBatches("train", cfg.batch_size, cfg.seed, cfg.spec)
    t0 = time.perf_counter()
    with Progress() as progress:
        task = progress.add_task("classifier", total=cfg.steps)
        for step in range(cfg.steps):
            x, y = next(batches)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            progress.update(task, advance=1, description=f"classifier loss {loss.item():.3f}")
            if (step + 1) % cfg.log_every == 0:
                progress.console.log(f"step {step + 1} loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    test = DigitClips("test", cfg.num_test, seed=cfg.seed + 1, spec=cfg.spec)
    acc = classifier_accuracy(model, test.clips, test.labels)
    seconds = time.perf_counter() - t0
    save_classifier(model, cfg.out, {"test_accuracy": f"{acc:.4f}", "train_seconds": f"{seconds:.0f}", "recipe": json.dumps(asdict(cfg), default=str)})
    return model, acc


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
