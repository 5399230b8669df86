"""The loop: iterations until the end, each one's logs handed to callbacks (the progress bar, the JSON
log, checkpoints, periodic samples), and resuming from the newest checkpoint of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from rcm.checkpoint.fingerprint import mismatch_message
from rcm.checkpoint import Checkpointer, atomic_write_bytes, checkpointer
from rcm.losses import RCMConfig, power_ema_gamma
from rcm.train.config import LoopConfig
from rcm.train.step import Task, TrainState, is_rank0, train_step





# A callback sees the state after each iteration and that iteration's logs (it may add to them); a
# truthy return value stops the loop after this iteration.
Callback = Callable[[TrainState, dict], Any]


def run_loop(state: TrainState, task: Task, loss: RCMConfig, loop: LoopConfig, callbacks: list[Callback] = (),
             ema_sigma_rel: float = 0.1) -> TrainState:
    """Train from `state.iteration` to `loop.iterations`, calling each callback after every iteration."""
    gamma = power_ema_gamma(ema_sigma_rel)
    while state.iteration < loop.iterations:
        logs = train_step(state, task, loss, gamma, loop.max_nonfinite_steps)
        stop = False
        for callback in callbacks:
            stop = bool(callback(state, logs)) or stop
        if stop:
            break
    return state


class JsonLog:
    """Callback: every `log_every`-th iteration (and every skipped one) as a JSON line of run_dir/log.jsonl
    (rank 0). Created at the iteration a run starts from: lines of later iterations, written by a run killed
    after its last checkpoint (and maybe a torn last line), are dropped, so a resumed run's log reads as
    an uninterrupted one's."""

    def __init__(self, run_dir: Path, log_every: int, start_iteration: int):
        self.path, self.log_every, self.start = Path(run_dir) / "log.jsonl", log_every, time.perf_counter()
        self.rank0 = is_rank0()
        if self.rank0 and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iteration"] < start_iteration:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a line torn by the kill
            atomic_write_bytes(self.path, "".join(kept).encode())

    def __call__(self, state: TrainState, logs: dict) -> None:
        if self.rank0 and (logs["iteration"] % self.log_every == 0 or logs.get("skipped")):
            logs["seconds"] = round(time.perf_counter() - self.start, 3)
            with open(self.path, "a") as f:
                f.write(json.dumps(logs) + "\n")


class Checkpoints:
    """Callback: a checkpoint every `checkpoint_every` iterations and at the last one (collective under DCP)."""

    def __init__(self, ckpt: Checkpointer, task: Task, record: dict, loop: LoopConfig):
        self.ckpt, self.task, self.record, self.loop = ckpt, task, record, loop

    def __call__(self, state: TrainState, logs: dict) -> None:
        if state.iteration % self.loop.checkpoint_every == 0 or state.iteration == self.loop.iterations:
            self.ckpt.save(state, {"task": self.task.state_dict(), "config": self.record})


def resume(state: TrainState, task: Task, ckpt: Checkpointer, record: dict) -> Path | None:
    """Load the newest good checkpoint into `state` and `task`; its path, or None if there is none."""

    def check(extra: dict, path: Path) -> None:
        saved, now = extra.get("config", {}).get("fingerprint"), record.get("fingerprint")
        if isinstance(saved, dict) and isinstance(now, dict):
            differs = mismatch_message(saved, now)
        else:  # a run of an older version (one string) or a test's plain tag
            differs = None if saved == now else "its settings were recorded by another version of rcm"
        if differs:
            raise ValueError(f"{path.parent.parent} holds a run with different settings ({differs}); "
                             f"use another --out-dir, or the same settings to continue it")

    found = ckpt.load_latest(state, check)
    if found is None:
        return None
    extra, path = found
    if "task" in extra:
        task.load_state_dict(extra["task"])
    return path


def loop_callbacks(state: TrainState, task: Task, run_dir: Path, record: dict, loop: LoopConfig,
                   ckpt: Checkpointer | None = None, mesh=None, json_log: bool = True) -> list[Callback]:
    """The JSON log (unless ``json_log`` is False) and the checkpoints of a run in `run_dir`, saved through
    `ckpt` (default: the run's checkpoints/ folder, DCP under `mesh`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt if ckpt is not None else checkpointer(run_dir / "checkpoints", mesh, keep=loop.keep_checkpoints)
    log = [JsonLog(run_dir, loop.log_every, state.iteration)] if json_log else []
    return [*log, Checkpoints(ckpt, task, record, loop)]
