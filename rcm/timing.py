"""Time and progress: named phases of a training step timed on demand, the device sync before reading a
clock, and the one rich progress bar of every command.

``with phase("scm.jvp"): ...`` marks a region. It always opens a ``torch.profiler.record_function`` range
(so a profile groups kernels by phase) and, only while a ``PhaseTimer`` is active, records its duration:
CUDA events on a GPU (no synchronization inside the step), wall time on the CPU. Phases nest; a timer
reports each name's total over every entry, so "dmd.rollout" counts all rollout steps of an iteration.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["PhaseTimer", "phase", "progress_bar", "sync"]

_active: "PhaseTimer | None" = None


class PhaseTimer:
    """Collects phase durations while active (``with PhaseTimer() as timer:``); ``seconds()`` after exit.

    cuda: time with CUDA events on the current device (default: when CUDA is available)."""

    def __init__(self, cuda: bool | None = None):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self._spans: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self) -> "PhaseTimer":
        global _active
        if _active is not None:
            raise RuntimeError("a PhaseTimer is already active")
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase name, in order of first entry (synchronizes CUDA)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for name, start, end in self._spans:
            totals[name] += start.elapsed_time(end) / 1e3 if self.cuda else end - start
        return dict(totals)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a region of a step as phase ``name`` (see the module docstring)."""
    timer = _active
    with torch.profiler.record_function(f"rcm.{name}"):
        if timer is None:
            yield
            return
        start = timer._mark()
        try:
            yield
        finally:
            timer._spans.append((name, start, timer._mark()))


def sync(device: torch.device | str) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a wall clock read next measures it; no-op elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress_bar(console=None, *, info: bool = False, transient: bool = False, every: int | None = None,
                 seconds: float = 30.0):
    """The rich progress bar of every command: description, bar, done/total, elapsed, remaining
    (``info``: plus a free-text column fed by ``update(task, info=...)``, e.g. the latest losses).

    Without a terminal (output to a pipe or a file) a live bar would only be drawn when it stops, so it
    prints plain lines instead: one every ``every`` steps (default: a twentieth of the total), at least one
    per ``seconds`` of wall time when steps come slower (checked at each update), and one at the end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console() if console is None else console
    if not console.is_terminal:
        return _LogLines(console, every, seconds)
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, transient=transient)


class _LogLines:
    """The progress bar's API (add_task, update, advance, context manager) as plain log lines."""

    def __init__(self, console, every: int | None, seconds: float):
        self.console, self.every, self.seconds = console, every, seconds
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "_LogLines":
        return self

    def __exit__(self, *exc) -> None:
        for task_id in self.tasks:
            self._line(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = dict(description=description, total=total, completed=completed, fields=fields,
                                   start=time.perf_counter(), logged_at=time.perf_counter(), logged=completed)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        for key, value in (("total", total), ("completed", completed), ("description", description)):
            if value is not None:
                task[key] = value
        task["completed"] += advance or 0
        task["fields"].update(fields)
        every = self.every or max(1, round((task["total"] or 20) / 20))
        done = task["total"] is not None and task["completed"] >= task["total"]
        if (task["completed"] - task["logged"] >= every or time.perf_counter() - task["logged_at"] >= self.seconds
                or done):
            self._line(task_id)

    def _line(self, task_id: int) -> None:
        task = self.tasks[task_id]
        if task["logged"] == task["completed"] and task["logged_at"] > task["start"]:
            return  # nothing new since the last line
        now = time.perf_counter()
        total = f"/{task['total']:g}" if task["total"] is not None else ""
        info = task["fields"].get("info")
        line = f"{task['description']} {task['completed']:g}{total}  {now - task['start']:.1f} s" + (f"  {info}" if info else "")
        task["logged"], task["logged_at"] = task["completed"], now
        if not self.console.quiet:
            self.console.file.write(line + "\n")
            self.console.file.flush()
