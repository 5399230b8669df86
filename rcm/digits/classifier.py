"""The digit-clip classifier that scores generated clips (`rcm train-classifier` trained the shipped one).

``DigitClassifier`` is a 3-D conv net; ``train_classifier`` trains it on fresh train-split clips and
saves it (``rcm/assets/digits_classifier.safetensors``; see ``rcm/assets/README.md`` for the command).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rcm import out_of_memory_as, use_threads
from rcm.digits.config import TrainClassifierConfig
from rcm.digits.data import NUM_CLASSES, ClipBatches, DigitClips
from rcm.timing import progress_bar
from rcm.checkpoint.atomic import atomic_write_with

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"


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


def save_small_model(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """A small evaluator network as safetensors, its constructor arguments (``model.config``) in the metadata."""
    from safetensors.torch import save_file

    meta = {"config": json.dumps(model.config), **{k: str(v) for k, v in (metadata or {}).items()}}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_small_model(cls: type, path: str | Path) -> nn.Module:
    """A network saved by ``save_small_model`` (strict), in eval mode, frozen."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = cls(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


def save_classifier(model: DigitClassifier, path: str | Path, metadata: dict | None = None) -> None:
    save_small_model(model, path, metadata)


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (or one saved by ``train_classifier``), in eval mode."""
    return load_small_model(DigitClassifier, Path(path) if path is not None else CLASSIFIER_PATH)


@torch.no_grad()
def classifier_accuracy(model: DigitClassifier, clips: torch.Tensor, labels: torch.Tensor, batch_size: int = 250) -> float:
    pred = torch.cat([model(clips[i : i + batch_size]).argmax(-1) for i in range(0, len(clips), batch_size)])
    return (pred == labels).float().mean().item()


def train_classifier(cfg: TrainClassifierConfig) -> tuple[DigitClassifier, float]:
    """Train the classifier on fresh train-split clips; save it; return it and its held-out accuracy.
    ``cfg.out`` is claimed for this process first (``rcm.checkpoint.run_folder.claimed_file``)."""
    from rcm.checkpoint.run_folder import claimed_file

    use_threads("threads", cfg.threads)
    with claimed_file(cfg.out, "out"):
        return _train_classifier(cfg)


def _train_classifier(cfg: TrainClassifierConfig) -> tuple[DigitClassifier, float]:
    torch.manual_seed(cfg.seed)
    model = DigitClassifier(cfg.width, cfg.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    batches = ClipBatches("train", cfg.batch_size, cfg.seed, cfg.spec)
    t0 = time.perf_counter()
    with progress_bar() as progress, out_of_memory_as("batch_size", "lower --batch-size or --width"):
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


