"""`rcm study`: the convergence study of the digits demo, as one resumable command.

Each method (rCM, DMD2, sCM) is an ordinary `rcm distill` run folder (``<out-dir>/<method>``) with the same
budget and settings (batch, learning rate, EMA, iterations). While it trains, the loop's periodic-sample
callback hands the task the EMA student every ``gcd(snapshots)`` iterations; at each snapshot iteration
the study's task samples the EMA at every step count on the report seed and scores it with every per-frame
metric (``rcm.digits.metrics``), writing ``<out-dir>/<method>/study/<iteration>.json``. A rerun resumes each
run from its last checkpoint and skips snapshots already scored. ``study.md`` and ``study.json`` (a row per
method@steps and snapshot, plus the teacher rows, scored first) and ``study.png`` (a panel per metric against
iterations, a line per method@steps, the teacher at 50 and 4 steps as dashed levels) are rewritten after every
scored snapshot, so a study stopped early (a lost machine, an interrupt) leaves the table of what it reached.

    rcm study --device cuda --snapshots 500 1000 2500 5000 10000 --concurrent   # one GPU, 3 processes
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from rcm.digits.config import StudyConfig
from rcm.checkpoint.atomic import atomic_write_bytes
from rcm.digits.evaluate import (COLUMNS, DigitsReport, digits_report, evaluate, markdown_table,
                                 print_table)
from rcm.digits.model import TeacherSampling, load_teacher, sample_student
from rcm.digits.task import DigitsDistillConfig, DigitsTask
from rcm.sample import resolve_device
from rcm.train import distill, start_run
from rcm.train.plots import Line, Panel, draw_panels, write_png

METRICS = [key for key, _, _ in COLUMNS if key != "sec_per_sample"]


class StudyTask(DigitsTask):
    """The digits task whose periodic samples are the study's snapshots: score the EMA student, don't draw it."""

    def __init__(self, cfg: DigitsDistillConfig, run, study: StudyConfig):
        super().__init__(cfg, run)
        self.study = study

    def write_samples(self, ema, iteration: int, run_dir: Path, console) -> None:
        path = run_dir / "study" / f"{iteration}.json"
        if iteration not in self.study.snapshots or path.is_file():
            return
        gens = {f"{self.cfg.method}@{n}": (lambda n: lambda labels, g: sample_student(ema, labels, g, steps=n))(n)
                for n in self.study.student_steps}
        rows = evaluate(gens, self.study.eval_config(), show=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps([{**r, "iteration": iteration, "method": self.cfg.method} for r in rows],
                                            indent=1).encode())
        console.print(f"study: {self.cfg.method} at {iteration}: " + ", ".join(
            f"{r['name']} acc {r['frame_accuracy']:.3f} FD {r['frame_fd']:.2f}" for r in rows))
        write_outputs(self.study)  # the table so far (other methods' processes may write it too: atomic writes)


def run_method(study: StudyConfig, method: str) -> None:
    """Train (or resume) one method's run, scoring its snapshots on the way."""
    cfg = study.distill_config(method)
    run = start_run(cfg, device=resolve_device(cfg.device))
    distill(StudyTask(cfg, run, study), cfg, run)


def collect_rows(study: StudyConfig) -> list[dict]:
    """Every scored snapshot of every method, ordered by method, step count, iteration."""
    rows = []
    for method in study.methods:
        for it in study.snapshots:
            path = Path(study.out_dir) / method / "study" / f"{it}.json"
            if path.is_file():
                rows += [r for r in json.loads(path.read_text()) if int(r["name"].split("@")[1]) in study.student_steps]
    return sorted(rows, key=lambda r: (study.methods.index(r["method"]), int(r["name"].split("@")[1]), r["iteration"]))


def teacher_rows(study: StudyConfig) -> list[dict]:
    """The teacher at `teacher_steps` on the same evaluation (cached rows where there are some)."""
    device = resolve_device(study.device)
    report = DigitsReport(student_steps=(), teacher_steps=study.teacher_steps, num_per_class=study.num_per_class,
                          num_real=study.num_real, seed=study.seed)
    return digits_report(load_teacher(device=device), {}, Path(study.out_dir) / "teacher", report, TeacherSampling(),
                         write_media=False)


TEACHER_ROWS = "teacher_rows.json"  # in the study folder: the teacher rows, scored once before training


def write_outputs(study: StudyConfig) -> dict:
    """``study.md``, ``study.json`` and ``study.png`` from every snapshot scored so far and the teacher rows."""
    out = Path(study.out_dir)
    rows = collect_rows(study)
    teachers = json.loads((out / TEACHER_ROWS).read_text())
    table = [{**r, "name": f"{r['name']} @ {r['iteration']} its"} for r in rows]
    atomic_write_bytes(out / "study.md", markdown_table(table + teachers).encode())
    atomic_write_bytes(out / "study.json", (json.dumps({"config": study.__dict__, "rows": rows, "teacher": teachers},
                                                       indent=1, default=str) + "\n").encode())
    plot_study(rows, teachers, out / "study.png")
    return {"rows": rows, "teacher": teachers, "table": str(out / "study.md"), "plot": str(out / "study.png"),
            "printed": table + teachers}


def run_study(study: StudyConfig) -> dict:
    """`rcm study`: train every method (one after the other, or concurrently), then the table and the plot.
    The study folder is claimed for this process (each method's run folder by its own run)."""
    from rcm.checkpoint.run_folder import claimed_folder

    with claimed_folder(study.out_dir, "study", legacy=("study_config.json",)):
        return _run_study(study)


def _run_study(study: StudyConfig) -> dict:
    from rich.console import Console

    out = Path(study.out_dir)
    atomic_write_bytes(out / "study_config.json", (json.dumps(study.__dict__, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / TEACHER_ROWS, json.dumps(teacher_rows(study), indent=1, default=str).encode())
    write_outputs(study)
    if study.concurrent and len(study.methods) > 1:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        procs = [ctx.Process(target=run_method, args=(study, m), name=f"study-{m}") for m in study.methods]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.name for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{', '.join(failed)} failed (rerun the same `rcm study` command, "
                               f"with --out-dir {study.out_dir}, to resume)")
    else:
        for method in study.methods:
            run_method(study, method)
    result = write_outputs(study)
    print_table(result.pop("printed"), title="convergence study (report seed)", console=Console())
    return result


# --------------------------------------------------------------------------------------------
# the plot (the engine's panel plotter)

PALETTE = {"rcm": (200, 30, 30), "dmd2": (30, 90, 200), "scm": (30, 150, 60)}
DASHES = {1: 0, 2: 6, 4: 2}  # step count -> dash length (0: solid)


def plot_study(rows: list[dict], teachers: list[dict], path: Path) -> Path:
    """A panel per metric (value against iterations, log-spaced x), a line per method@steps, dashed grey
    levels for the teacher rows; a legend at the bottom."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r["name"], []).append(r)

    def line(name: str, key: str | None) -> Line:
        method, steps = name.split("@")
        points = [(p["iteration"], p[key]) for p in series[name]] if key else []
        return Line(name, points, PALETTE.get(method, (0, 0, 0)), DASHES.get(int(steps), 4))

    panels = [Panel(key, [line(name, key) for name in series], [(t["name"], t[key]) for t in teachers])
              for key in METRICS]
    return write_png(draw_panels(panels, log_x=True, legend=[line(name, None) for name in series]), path)
