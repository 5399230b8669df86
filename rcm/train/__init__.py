"""The training engine: sCM, DMD2 or rCM over any application's task (its teacher, data and outputs).

One iteration is a student or a critic iteration (docs/method.md §3.1). A student iteration backpropagates
each loss term as it is produced (the sCM graph is freed before the DMD rollout), then takes one optimizer
step and updates the power-function EMA; a critic iteration trains the fake score. ``run_loop`` runs
iterations and hands each one's logs to callbacks (progress, the JSON log, checkpoints, periodic samples).
Everything a resumed run needs (models, optimizers, schedulers, EMA, counters, every RNG state, the data
position) is in the checkpoint, so a run killed at any point and resumed continues exactly as if never
stopped. ``distill`` is the one driver of every application; it imports no application and no command.

    config.py   what a run is given, torch-free: LoopConfig, OptimizerConfig, the method, the log sinks,
                DistillConfig (what every application's config extends)
    step.py     TrainState, init_state, train_step, the Task protocol
    loop.py     run_loop and its callbacks (JSON log, checkpoints), resume
    sinks.py    the other log sinks (`--log`): TensorBoard, W&B
    plots.py    the one line plotter: a run's log.png (`rcm plot`), the study's plot
    driver.py   start_run and distill, the one driver of every application
"""

from rcm import lazy_exports
from rcm.train.config import DistillConfig, LoopConfig, Method, OptimizerConfig, method_config

# imported on first use (torch): importing the package, or its torch-free config, stays light
__getattr__, __dir__ = lazy_exports(__name__, {
    "MasterWeightAdamW": "rcm.train.optim",
    **dict.fromkeys(["Run", "distill", "start_run"], "rcm.train.driver"),
    **dict.fromkeys(["Callback", "Checkpoints", "JsonLog", "loop_callbacks", "resume", "run_loop"], "rcm.train.loop"),
    **dict.fromkeys(["NonFiniteError", "Task", "TrainState", "ema_step_count", "init_state",
                     "is_rank0", "train_step"], "rcm.train.step"),
})

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
