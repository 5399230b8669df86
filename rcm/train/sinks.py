"""Where a run's logs go besides `log.jsonl`: TensorBoard event files and Weights & Biases (offline by default).

`--log` picks the sinks (``jsonl``, ``tensorboard``, ``wandb``); ``check_sink_packages`` refuses one whose
package is missing before any work. ``LogSinks`` is a loop callback (rank 0 only, like the JSON log): every logged
iteration's numbers (every loss term, g-norm, ω, learning rates, gradient norms, non-finite counts, s/iter,
peak memory — whatever the step and the progress callback put in the record) become scalars, and the
periodic samples a task hands back become images. TensorBoard writes under ``<run>/tensorboard``; a resumed
run purges the events of iterations after its checkpoint, as the JSON log drops those lines.
W&B writes under ``<run>/wandb`` in offline mode unless ``WANDB_MODE`` says otherwise (sync later with
``wandb sync``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from rcm import ConfigError
from rcm.train.config import SINK_PACKAGES
from rcm.train.step import TrainState, is_rank0

_NOT_SCALARS = ("iteration", "phase")


def check_sink_packages(field: str, sinks: tuple[str, ...]) -> None:
    """A ``ConfigError`` on ``field`` for a sink whose package is not installed. Called when a run starts,
    not when a config is built: building the default config (`rcm --help`) must not need the packages."""
    for sink in sinks:
        package = SINK_PACKAGES.get(sink)
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(field, f"{sink} logging needs the {package} package (pip install {package}), "
                                     f"which is not installed")


def scalar_tag(key: str, logs: dict) -> str:
    """The TensorBoard / W&B name of a log key, grouped by what it belongs to: ``loss_scm`` -> ``loss/scm``,
    ``scm_g_norm`` -> ``scm/g_norm`` (a term of this record), ``student_lr`` -> ``student/lr`` (this record's
    phase), anything else under ``run/`` (``run/seconds_per_iteration``, ``run/peak_memory_gib``)."""
    head, _, rest = key.partition("_")
    if rest and (head == "loss" or head == logs.get("phase") or f"loss_{head}" in logs):
        return f"{head}/{rest}"
    return f"run/{key}"


def scalars(logs: dict) -> dict[str, float]:
    """The numbers of a log record by their tags (a skipped step's flag as 1.0)."""
    out = {}
    for key, value in logs.items():
        if key not in _NOT_SCALARS and isinstance(value, (int, float)):  # bool is an int
            out[scalar_tag(key, logs)] = float(value)
    return out


class TensorBoardSink:
    """Scalars and images as TensorBoard event files under ``<run_dir>/tensorboard`` (the `tensorboard`
    package's writer, through torch.utils.tensorboard)."""

    def __init__(self, run_dir: Path, start_iteration: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of iterations >= the resumed one (written after the checkpoint) are discarded
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=start_iteration or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HW" if image.ndim == 2 else "HWC")

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars and images as a W&B run under ``<run_dir>/wandb``; offline unless ``WANDB_MODE`` is set. The
    W&B run id is kept in the run folder (``wandb/rcm_run_id``), so a resumed run continues the same W&B run
    instead of starting a new one."""

    def __init__(self, run_dir: Path, config: dict):
        import secrets

        import wandb

        from rcm.checkpoint.atomic import atomic_write_bytes

        self.wandb = wandb
        id_file = Path(run_dir) / "wandb" / "rcm_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(8)
            id_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(id_file, run_id.encode())
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rcm"), name=Path(run_dir).name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.run.log({tag: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


class LogSinks:
    """Loop callback: every ``log_every``-th iteration's record (and every skipped one's) to each chosen sink
    but ``jsonl`` (that is ``JsonLog``); ``images`` takes a task's periodic samples. Rank 0 alone writes; on
    other ranks it holds no sink."""

    def __init__(self, sinks: tuple[str, ...], run_dir: Path, log_every: int, start_iteration: int,
                 config: dict | None = None):
        self.log_every, self.sinks = log_every, []
        if not is_rank0():
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if "tensorboard" in sinks:
            self.sinks.append(TensorBoardSink(run_dir, start_iteration))
        if "wandb" in sinks:
            self.sinks.append(WandbSink(run_dir, config or {}))

    def __call__(self, state: TrainState, logs: dict) -> None:
        if self.sinks and (logs["iteration"] % self.log_every == 0 or logs.get("skipped")):
            values = scalars(logs)
            for sink in self.sinks:
                sink.scalars(logs["iteration"], values)

    def images(self, iteration: int, images: dict) -> None:
        """``{tag: uint8 [H, W] or [H, W, 3]}`` (what a task's ``write_samples`` returns under "images")."""
        for tag, image in images.items():
            image = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
            for sink in self.sinks:
                sink.image(iteration, f"samples/{tag}", image)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
