"""Search the digits students' sampling mid-times on a trained run, post hoc (no retraining).

The mid-times are a sampling choice, not a training one: the student is trained on every time. So each
run's EMA student (``name=path`` to a run folder: its student_ema.safetensors when finished, else its newest
checkpoint's) is sampled at ``--steps``
with every candidate mid-time tuple on the *selection* seed and scored with `rcm eval`'s metrics; choose
there, then report on the report seed (`rcm study` / `rcm eval`).

    python3 scripts/digits_midtimes.py --runs rcm=runs/study/rcm dmd2=runs/study/dmd2 --steps 4 \\
        --candidates 1.3,1.0,0.6 1.1,0.8,0.5 1.0,0.6,0.3 --seed 1 --out runs/midtimes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def parse_times(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="name=run_folder (its newest checkpoint's EMA student)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--candidates", nargs="+", type=parse_times, required=True, help="comma-separated mid-times")
    ap.add_argument("--seed", type=int, default=1, help="the selection seed (the report seed is 0)")
    ap.add_argument("--num-per-class", type=int, default=20)
    ap.add_argument("--num-real", type=int, default=500)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("runs/midtimes"))
    args = ap.parse_args()

    import torch

    from rcm.checkpoint.export import ExportConfig, export
    from rcm.digits.evaluate import EvalConfig, evaluate, markdown_table
    from rcm.digits.model import load_model, sample_student

    for times in args.candidates:
        if len(times) != args.steps - 1:
            raise SystemExit(f"{args.steps} steps need {args.steps - 1} mid-times, got {times}")
    students = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            name, run = spec.split("=", 1)
            path = Path(run) / "student_ema.safetensors"  # a finished run's; else its newest checkpoint's EMA
            if not path.is_file():
                path = export(ExportConfig(checkpoint=Path(run) / "checkpoints", out=Path(tmp) / f"{name}.safetensors",
                                           dtype="float32"))
            students[name] = load_model(path, device=args.device)
    gens = {}
    for name, student in students.items():
        for times in args.candidates:
            label = f"{name}@{args.steps} mid {','.join(f'{t:g}' for t in times)}"
            gens[label] = (lambda s, m: lambda labels, g: sample_student(s, labels, g, steps=args.steps, mid_times=m))(
                student, times)
    t0 = time.perf_counter()
    with torch.no_grad():
        rows = evaluate(gens, EvalConfig(num_per_class=args.num_per_class, num_real=args.num_real, seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"midtimes_{args.steps}.md").write_text(markdown_table(rows))
    (args.out / f"midtimes_{args.steps}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                      "rows": rows}, indent=2))
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s → {args.out}")


if __name__ == "__main__":
    main()
