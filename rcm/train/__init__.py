"""The training engine: sCM, DMD2 or rCM over any application's task (its teacher, data and outputs).

One iteration is a student or a critic iteration (docs/method.md §3.1). A student iteration backpropagates
each loss term as it is produced (the sCM graph is freed before the DMD rollout), then takes one optimizer
step and updates the power-function EMA; a critic iteration trains the fake score. ``run_loop`` runs
iterations and hands each one's logs to callbacks (progress, the JSON log, checkpoints, periodic samples).
Everything a resumed run needs (models, optimizers, schedulers, EMA, counters, every RNG state, the data
position) is in the checkpoint, so a run killed at any point and resumed continues exactly as if never
stopped. ``distill`` is the one driver of every application; it imports no application and no command.

    step.py     TrainState, init_state, train_step, the Task protocol
    loop.py     LoopConfig, run_loop and its callbacks (JSON log, checkpoints), resume
    sinks.py    the other log sinks (`--log`): TensorBoard, W&B
    plots.py    the one line plotter: a run's log.png (`rcm plot`), the study's plot
    distill.py  DistillConfig (what every application's config extends), start_run, distill
"""

from rcm.optim import MasterWeightAdamW, OptimizerConfig
from rcm.train.distill import DistillConfig, Run, distill, start_run
from rcm.train.loop import Callback, Checkpoints, JsonLog, LoopConfig, loop_callbacks, resume, run_loop
from rcm.train.step import (
    Method,
    NonFiniteError,
    Task,
    TrainState,
    ema_step_count,
    init_state,
    is_rank0,
    method_config,
    train_step,
)

__all__ = [
    "Callback",
    "Checkpoints",
    "DistillConfig",
    "JsonLog",
    "LoopConfig",
    "MasterWeightAdamW",
    "Method",
    "NonFiniteError",
    "OptimizerConfig",
    "Run",
    "Task",
    "TrainState",
    "distill",
    "ema_step_count",
    "init_state",
    "is_rank0",
    "loop_callbacks",
    "method_config",
    "resume",
    "run_loop",
    "start_run",
    "train_step",
]
