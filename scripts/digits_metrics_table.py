"""Score held-out real digit clips, each corruption of them and (optionally) the shipped teacher with the
per-frame metrics of ``rcm.digits.metrics``, next to the old clip-pooled accuracy and FD; print a
markdown table. With ``--png``, also write the teacher's first clips as a grid and print the frame
classifier's reading of each of their frames, to compare with the eye.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python3 scripts/digits_metrics_table.py --teacher-per-class 20 \
        --png runs/metrics/teacher.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


from rcm.digits.data import NUM_CLASSES, DigitClips, clip_grid
from rcm.digits.model import TeacherSampling, load_teacher, sample_teacher
from rcm.digits.evaluate import RealReference, clip_metrics, load_classifier
# ---
from rcm.digits import corruptions
from rcm.digits.metrics import classify_frames, frame_metrics, real_reference

COLUMNS = ["frame_accuracy", "switching_share", "shape_change", "motion_residual", "speed_ratio", "stray_ink",
           "frame_fd", "frame_diversity"]


def teacher_clips(per_class: int, seed: int, steps: int, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped teacher's ``steps``-step samples (UniPC, CFG 2.0), ``per_class`` of each digit, cached on disk."""
    path = cache_dir / f"teacher{steps}_seed{seed}_n{per_class}.pt"
    labels = torch.arange(per_class * NUM_CLASSES) % NUM_CLASSES
    if path.exists():
        return torch.load(path)["clips"], labels
    model, g = load_teacher(), torch.Generator().manual_seed(seed)
    clips = torch.cat([sample_teacher(model, labels[i : i + 50], g, TeacherSampling(steps=steps)) for i in range(0, len(labels), 50)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"clips": clips, "labels": labels}, path)
    return clips, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-real", type=int, default=500, help="held-out real clips to score (and corrupt)")
    p.add_argument("--real-seed", type=int, default=7)
    p.add_argument("--teacher-per-class", type=int, default=0, help="0: skip the teacher")
    p.add_argument("--teacher-seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, nargs="+", default=[50, 4], help="one row per step count")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/metrics"))
    p.add_argument("--png", type=Path, default=None, help="grid of the first teacher row's first 20 clips")
    args = p.parse_args()

    reference = real_reference()
    old_model = load_classifier()
    old_real = DigitClips("test", 1000, seed=1234)
    old_reference = RealReference.from_clips(old_model, old_real.clips, old_real.labels)

    real = DigitClips("test", args.num_real, seed=args.real_seed)
    g = torch.Generator().manual_seed(0)
    sets = {
        "real (held out)": (real.clips, real.labels),
        "speckle 2%": (corruptions.speckle(real.clips, g), real.labels),
        "digit switched mid-clip": (corruptions.switch_digit(real.clips, real.labels, g), real.labels),
        "blur σ=0.8": (corruptions.blur(real.clips), real.labels),
        "frozen motion": (corruptions.freeze(real.clips), real.labels),
    }
    for steps in args.teacher_steps if args.teacher_per_class else []:
        sets[f"teacher@{steps} (CFG 2)"] = teacher_clips(args.teacher_per_class, args.teacher_seed, steps, args.cache_dir)

    header = ["clips", *COLUMNS, "old clip accuracy", "old FD"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, (clips, labels) in sets.items():
        new = frame_metrics(clips, labels, reference)
        old = clip_metrics(old_model, clips, labels, old_reference)
        cells = [f"{new[k]:.3f}" for k in COLUMNS] + [f"{old['accuracy']:.3f}", f"{old['fd']:.2f}"]
        print(f"| {name} (n={len(clips)}) | " + " | ".join(cells) + " |")

    teacher_rows = [name for name in sets if name.startswith("teacher@")]
    if args.png is not None and teacher_rows:
        from PIL import Image

        clips, labels = sets[teacher_rows[0]]
        Image.fromarray(clip_grid(clips[:20], scale=6)).save(args.png)
        _, logits = classify_frames(reference.classifier, clips[:20])
        print(f"\n{args.png}: requested digit -> per-frame reading")
        for i, row in enumerate(logits.argmax(-1).tolist()):
            print(f"  row {i:2d}: {labels[i].item()} -> {' '.join(map(str, row))}")


if __name__ == "__main__":
    main()
