"""Settings search for the digits demo: many `rcm study` runs of one method each, concurrently on one GPU.

Each variant is a resumable study run folder (``<out>/<variant>``) scored at its snapshots on the
*selection* seed (default 1) at 1/2/4 steps with the presets' mid-times plus extra 2-step mid-times, and
on the report seed (default 0) exactly as `rcm study` scores (so a chosen variant's run folder continues as
a study run: `rcm study` with the same settings resumes it). The search stops at ``--deadline`` seconds (unfinished
runs keep their last checkpoint: rerun to extend them) and writes ``search.md`` / ``search.json``.

    python3 scripts/digits_search.py --out runs/search --deadline 480 \\
        --variants rcm-base:rcm:bs=64 rcm-d32:rcm:bs=64,dmd=32 dmd2:dmd2:bs=64

A variant is ``name:method:key=value,...`` with keys bs (batch), lr, dmd (λ_DMD), freq (student update
frequency), warm (sCM tangent warmup), pmean / pstd (sCM log-normal time), shift (DMD time shift), ema
(EMA σ_rel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

EXTRA_MID_TIMES_2 = ((0.8,), (1.2,))  # besides the presets' (1.0,)


def parse_variant(text: str):
    from rcm.digits import presets
    from rcm.losses import LogNormalTime, UniformShiftTime

    name, method, *rest = text.split(":")
    opts = dict(kv.split("=") for kv in (rest[0].split(",") if rest and rest[0] else []))
    unknown = set(opts) - {"bs", "lr", "dmd", "freq", "warm", "pmean", "pstd", "shift", "ema"}
    if unknown:
        raise SystemExit(f"variant {name}: unknown keys {sorted(unknown)}")
    loss = presets.LOSS
    scm, dmd = loss.scm, loss.dmd
    if "warm" in opts:
        scm = dataclasses.replace(scm, tangent_warmup=int(opts["warm"]))
    if "pmean" in opts or "pstd" in opts:
        scm = dataclasses.replace(scm, time_dist=LogNormalTime(float(opts.get("pmean", scm.time_dist.p_mean)),
                                                               float(opts.get("pstd", scm.time_dist.p_std))))
    if "dmd" in opts:
        dmd = dataclasses.replace(dmd, loss_scale=float(opts["dmd"]))
    if "shift" in opts:
        dmd = dataclasses.replace(dmd, time_dist=UniformShiftTime(float(opts["shift"])))
    loss = dataclasses.replace(loss, scm=scm, dmd=dmd,
                               student_update_freq=int(opts.get("freq", loss.student_update_freq)))
    settings = {"batch_size": int(opts.get("bs", 64)), "lr": float(opts.get("lr", 1e-4)), "loss": loss,
                "ema_sigma_rel": float(opts.get("ema", presets.EMA_SIGMA_REL))}
    return name, method, settings, opts


def run_variant(study, method: str, selection_seed: int) -> None:
    import torch

    from rcm.digits.evaluate import evaluate
    from rcm.digits.model import sample_student
    from rcm.digits.study import StudyTask
    from rcm.sample import resolve_device
    from rcm.train import distill, start_run

    class SearchTask(StudyTask):
        """Scores each snapshot twice: on the study's (report) seed as ``<it>.json``, exactly as `rcm study`
        does (so a chosen run continues as a study run), and on the selection seed with extra 2-step
        mid-times as ``<it>.sel.json``."""

        def write_samples(self, ema, iteration, run_dir, console):
            super().write_samples(ema, iteration, run_dir, console)
            path = run_dir / "study" / f"{iteration}.sel.json"
            if iteration not in self.study.snapshots or path.is_file():
                return
            sample = lambda n, m: lambda labels, g: sample_student(ema, labels, g, steps=n, mid_times=m)  # noqa: E731
            gens = {f"{method}@{n}": sample(n, None) for n in self.study.student_steps}
            gens.update({f"{method}@2m{m[0]}": sample(2, m) for m in EXTRA_MID_TIMES_2})
            cfg = dataclasses.replace(self.study.eval_config(), seed=selection_seed)
            rows = evaluate(gens, cfg, show=False)
            path.write_text(json.dumps([{**r, "iteration": iteration, "method": method} for r in rows], indent=1))

    cfg = study.distill_config(method)
    run = start_run(cfg, device=resolve_device(cfg.device))
    distill(SearchTask(cfg, run, study), cfg, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/search"))
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--snapshots", type=int, nargs="+", default=[1000, 2000, 3000, 4000])
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds of training before the search stops")
    ap.add_argument("--selection-seed", type=int, default=1, help="the seed settings are chosen on")
    ap.add_argument("--seed", type=int, default=0, help="the report seed (rows as `rcm study` writes them)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-per-class", type=int, default=20)
    ap.add_argument("--num-real", type=int, default=500)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    args = ap.parse_args()

    from rcm.digits.study import StudyConfig, teacher_rows

    studies = {}
    for text in args.variants:
        name, method, settings, opts = parse_variant(text)
        studies[name] = (StudyConfig(out_dir=args.out / name, methods=(method,), snapshots=tuple(args.snapshots),
                                     seed=args.seed, device=args.device, threads=1, num_per_class=args.num_per_class,
                                     num_real=args.num_real, checkpoint_every=args.checkpoint_every, **settings),
                         method, opts)
    ctx = multiprocessing.get_context("spawn")
    procs = {name: ctx.Process(target=run_variant, args=(s, m, args.selection_seed), name=name) for name, (s, m, _) in studies.items()}
    start = time.monotonic()
    for p in procs.values():
        p.start()
    while any(p.is_alive() for p in procs.values()) and time.monotonic() - start < args.deadline:
        time.sleep(2)
    for p in procs.values():
        if p.is_alive():
            p.terminate()
    for p in procs.values():
        p.join()
    wall = time.monotonic() - start

    rows = []
    for name, (study, method, opts) in studies.items():
        for path in sorted((args.out / name / method / "study").glob("*.sel.json"),
                           key=lambda p: int(p.name.split(".")[0])):
            for r in json.loads(path.read_text()):
                rows.append({**r, "variant": name, "opts": opts})
    first = next(iter(studies.values()))[0]
    teachers = teacher_rows(dataclasses.replace(first, out_dir=args.out / "teacher", seed=args.selection_seed))
    keys = ("frame_accuracy", "switching_share", "stray_ink", "frame_fd", "frame_diversity")
    lines = ["| variant | generator | its | frame acc | switching | stray ink | frame FD | diversity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["variant"], r["name"], r["iteration"])):
        lines.append(f"| {r['variant']} | {r['name']} | {r['iteration']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    for t in teachers:
        lines.append(f"| teacher | {t['name']} | — | " + " | ".join(f"{t[k]:.3f}" for k in keys) + " |")
    (args.out / "search.md").write_text("\n".join(lines) + "\n")
    (args.out / "search.json").write_text(json.dumps({"rows": rows, "teacher": teachers, "wall_s": wall,
                                                      "variants": args.variants, "selection_seed": args.selection_seed}, indent=1,
                                                     default=str))
    print("\n".join(lines))
    print(f"search wall {wall:.0f} s; exit codes: " + ", ".join(f"{n}={p.exitcode}" for n, p in procs.items()))


if __name__ == "__main__":
    main()
