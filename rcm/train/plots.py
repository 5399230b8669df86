"""Line plots as PNG files, and `rcm plot RUN`: a run's `log.jsonl` as `log.png`, a panel per logged number.

The one plotter of the repository (PIL, which imageio brings: no plotting dependency): ``draw_panels``
draws a grid of panels, each a few lines against iterations with optional dashed reference levels, and
a legend; the end of every distill run (``plot_run_log``), `rcm plot` and `rcm study` (study.png) use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import tyro

from rcm import ConfigError
from rcm.checkpoint.atomic import atomic_write_with

PANEL = (300, 200)  # width, height in pixels
_MARGIN = 40  # left margin of a panel (its y labels)
_GRID = (160, 160, 160)
_LEVEL = (150, 150, 150)
LOG_LINE = (30, 90, 200)


@dataclass
class Line:
    """One series: points (x, y) drawn in ``color``, dashed with dashes ``dash`` pixels long (0: solid)."""

    name: str
    points: list[tuple[float, float]]
    color: tuple[int, int, int] = LOG_LINE
    dash: int = 0


@dataclass
class Panel:
    title: str
    lines: list[Line]
    levels: list[tuple[str, float]] = field(default_factory=list)
    """named horizontal reference values, drawn as dashed grey lines (e.g. the teacher's score)."""
    log_y: bool = False


def _segment(draw, points, color, dash: int, width: int = 2) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if not dash:
            draw.line([(x0, y0), (x1, y1)], fill=color, width=width)
            continue
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // dash))
        for i in range(0, n, 2):
            a, b = i / n, min(1.0, (i + 1) / n)
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                      fill=color, width=width)


def _ticks(xs: list[float], log_x: bool) -> list[float]:
    """Every x when there are few, else five spread over the range (log-spaced on a log axis)."""
    xs = sorted(set(xs))
    if len(xs) <= 8:
        return xs
    lo, hi = xs[0], xs[-1]
    if log_x:
        return sorted({round(math.exp(math.log(lo) + i / 4 * (math.log(hi) - math.log(lo)))) for i in range(5)})
    return sorted({round(lo + i / 4 * (hi - lo)) for i in range(5)})


def draw_panels(panels: list[Panel], log_x: bool = False, cols: int = 4, panel: tuple[int, int] = PANEL,
                legend: list[Line] = ()):
    """A PIL image: the panels in rows of ``cols`` (all on one x range), each titled with its range written
    at the left; non-finite points are left out; a legend row per four ``legend`` lines at the bottom."""
    from PIL import Image, ImageDraw

    pw, ph = panel
    grid_rows = max(1, math.ceil(len(panels) / cols))
    legend_h = 20 * math.ceil(len(legend) / 4) + (4 if legend else 0)
    img = Image.new("RGB", (cols * pw, grid_rows * ph + legend_h), "white")
    draw = ImageDraw.Draw(img)
    xs = [x for p in panels for line in p.lines for x, y in line.points if math.isfinite(y)] or [1.0]
    fx = (lambda v: math.log(max(v, 1e-12))) if log_x else (lambda v: v)  # noqa: E731
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0
    for k, p in enumerate(panels):
        ox, oy = (k % cols) * pw, (k // cols) * ph
        fy = (lambda v: math.log10(v)) if p.log_y else (lambda v: v)  # noqa: E731
        ys = [y for line in p.lines for _, y in line.points if math.isfinite(y) and (y > 0 or not p.log_y)]
        ys += [v for _, v in p.levels]
        lo, hi = (fy(min(ys)), fy(max(ys))) if ys else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        x = lambda v: ox + _MARGIN + (fx(v) - x_lo) / (x_hi - x_lo) * (pw - _MARGIN - 10)  # noqa: E731
        y = lambda v: oy + ph - 25 - (fy(v) - lo) / (hi - lo) * (ph - 45)  # noqa: E731
        draw.rectangle([ox + _MARGIN, oy + 20, ox + pw - 10, oy + ph - 25], outline=_GRID)
        draw.text((ox + _MARGIN, oy + 4), p.title + ("  (log y)" if p.log_y else ""), fill="black")
        top, bottom = (10**hi, 10**lo) if p.log_y else (hi, lo)
        draw.text((ox + 2, oy + 18), f"{top:.3g}", fill="black")
        draw.text((ox + 2, oy + ph - 32), f"{bottom:.3g}", fill="black")
        for t in _ticks(xs, log_x):
            draw.text((x(t) - 8, oy + ph - 20), f"{t:g}", fill=(90, 90, 90))
        for name, value in p.levels:
            _segment(draw, [(ox + _MARGIN, y(value)), (ox + pw - 10, y(value))], _LEVEL, 4, width=1)
            draw.text((ox + pw - 60, y(value) - 11), name, fill=(120, 120, 120))
        for line in p.lines:
            xy = [(x(a), y(b)) for a, b in sorted(line.points) if math.isfinite(b) and (b > 0 or not p.log_y)]
            _segment(draw, xy, line.color, line.dash)
            if len(xy) <= 40:  # dots while they stay apart
                for px, py in xy:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=line.color)
    for i, line in enumerate(legend):
        lx, ly = 10 + (i % 4) * 160, grid_rows * ph + 4 + 20 * (i // 4)
        _segment(draw, [(lx, ly + 6), (lx + 40, ly + 6)], line.color, line.dash)
        draw.text((lx + 46, ly), line.name, fill="black")
    return img


def write_png(image, path: Path) -> Path:
    """``image`` (PIL) as a PNG at ``path``, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------
# a run's log

_SKIPPED_KEYS = ("iteration", "phase", "seconds")  # `seconds`: the wall clock since the start, not a rate


def read_log(run_dir: Path) -> list[dict]:
    """The records of ``<run_dir>/log.jsonl`` (a line torn by a kill is skipped)."""
    records = []
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def log_panels(records: list[dict]) -> list[Panel]:
    """A panel per number the log carries (loss terms first, then in order of appearance): its values
    against iterations, on a log scale when all positive and spread over more than two decades."""
    keys: list[str] = []
    for record in records:
        for key, value in record.items():
            if key not in keys and key not in _SKIPPED_KEYS and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                keys.append(key)
    keys.sort(key=lambda k: not k.startswith("loss_"))  # stable: the rest keep their order
    panels = []
    for key in keys:
        points = [(float(r["iteration"]), float(r[key])) for r in records
                  if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        finite = [v for _, v in points if math.isfinite(v)]
        log_y = bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 100
        panels.append(Panel(key, [Line(key, points)], log_y=log_y))
    return panels


def plot_run_log(run_dir: Path) -> Path | None:
    """``<run_dir>/log.png``: ``log_panels`` of the run's log.jsonl; its path, or None (nothing written)
    when the log holds no number yet."""
    panels = log_panels(read_log(run_dir))
    return write_png(draw_panels(panels), Path(run_dir) / "log.png") if panels else None


@dataclass
class PlotConfig:
    """Plot a run's log.jsonl as log.png in the run folder: a panel per logged number (loss terms, g-norm,
    ω, learning rates, gradient norms, s/iteration, ...) against iterations. Reads the folder, claims nothing."""

    run_dir: Annotated[Path, tyro.conf.Positional, tyro.conf.arg(metavar="RUN_DIR")]
    """a distill run folder (one holding log.jsonl)."""

    def __post_init__(self):
        log = Path(self.run_dir) / "log.jsonl"
        if not Path(self.run_dir).is_dir():
            raise ConfigError("run_dir", f"no folder at {self.run_dir}")
        if not log.is_file():
            raise ConfigError("run_dir", f"{self.run_dir} holds no log.jsonl (not a distill run folder?)")


def plot_run(cfg: PlotConfig) -> Path:
    """`rcm plot RUN`: write RUN/log.png and say where."""
    path = plot_run_log(cfg.run_dir)
    if path is None:
        raise ConfigError("run_dir", f"{Path(cfg.run_dir) / 'log.jsonl'} holds no logged iteration yet")
    print(f"log plot → {path}")
    return path
