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


def progress_bar(console=None, *, info: bool = False, transient: bool = False):
    """The rich progress bar of every command: description, bar, done/total, elapsed, remaining
    (``info``: plus a free-text column fed by ``update(task, info=...)``, e.g. the latest losses)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, console=console, transient=transient)
