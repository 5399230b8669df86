"""Phase timing: nested phases accumulate per name, and a training step reports each of its phases."""

import time

import pytest
import torch

from rcm.train import init_state, train_step
from rcm.timing import PhaseTimer, phase
from tests.test_train import LOSS, OPTIM, ToyTask


def test_phases_nest_and_accumulate():
    with PhaseTimer(cuda=False) as timer:
        with phase("outer"):
            for _ in range(2):
                with phase("inner"):
                    time.sleep(0.01)
    with phase("untimed"):  # no timer active: only a profiler range, nothing recorded
        pass
    seconds = timer.seconds()
    assert list(seconds) == ["inner", "outer"]
    assert 0.02 <= seconds["inner"] <= seconds["outer"]


def test_only_one_timer_at_a_time():
    with PhaseTimer(cuda=False):
        with pytest.raises(RuntimeError, match="already active"):
            PhaseTimer(cuda=False).__enter__()


def test_train_step_phases():
    task = ToyTask()
    state = init_state(task.build_teacher(), LOSS, OPTIM, OPTIM, seed=0, device=torch.device("cpu"))
    state.iteration = LOSS.scm.tangent_warmup  # first iteration after warmup: a student step with sCM and DMD
    with PhaseTimer(cuda=False) as timer:
        train_step(state, task, LOSS, ema_gamma=6.94, max_nonfinite=3)
    student = timer.seconds()
    assert set(student) == {"scm.teacher", "scm.jvp", "scm.student_forward", "scm.backward", "dmd.rollout",
                            "dmd.scores", "dmd.backward", "optimizer", "ema"}
    assert all(s > 0 for s in student.values())
    with PhaseTimer(cuda=False) as timer:  # the next iteration trains the critic
        train_step(state, task, LOSS, ema_gamma=6.94, max_nonfinite=3)
    assert set(timer.seconds()) == {"critic.rollout", "critic.forward", "critic.backward", "optimizer"}
