"""bf16 networks with fp32 master weights, and the compiled training step against the eager one."""

import copy

import torch

from rcm.train import MasterWeightAdamW, init_state, train_step
from rcm.timing import PhaseTimer
from tests.test_train import LOSS, OPTIM, ToyTask

CPU = torch.device("cpu")


def _steps(state, task, n):
    return [train_step(state, task, LOSS, ema_gamma=6.94, max_nonfinite=3) for _ in range(n)]


def test_master_weights_step_like_fp32_adamw_and_write_back():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    ref = torch.nn.Parameter(p.detach().float().clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    for _ in range(3):
        g = torch.randn(64).to(torch.bfloat16)
        p.grad, ref.grad = g.clone(), g.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    master = opt.param_groups[0]["params"][0]
    assert master.dtype == torch.float32 and p.grad is None
    torch.testing.assert_close(master, ref, rtol=0, atol=0)  # the masters are exactly fp32 AdamW
    torch.testing.assert_close(p, ref.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(master, p.float())  # updates below bf16 resolution are kept in the masters


def test_bf16_state_resumes_exactly():
    task = ToyTask()
    state = init_state(task.build_teacher(), LOSS, OPTIM, OPTIM, seed=0, device=CPU, dtype=torch.bfloat16)
    assert state.student.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert state.ema.blocks[0].ffn[0].weight.dtype == torch.float32
    assert isinstance(state.student_optimizer, MasterWeightAdamW)
    _steps(state, task, 3)
    saved, task_saved = copy.deepcopy(state.state_dict()), copy.deepcopy(task.state_dict())
    logs = _steps(state, task, 3)

    task2 = ToyTask()
    task2.load_state_dict(task_saved)
    state2 = init_state(task2.build_teacher(), LOSS, OPTIM, OPTIM, seed=5, device=CPU, dtype=torch.bfloat16)
    state2.load_state_dict(saved)
    logs2 = _steps(state2, task2, 3)
    assert logs == logs2
    for a, b in zip(state.student_optimizer.state_dict()["master_weights"],
                    state2.student_optimizer.state_dict()["master_weights"]):
        assert torch.equal(a, b)


def test_compiled_step_matches_eager():
    """The compiled networks and the compiled JVP pass give the eager step's losses and gradients (aot_eager:
    Dynamo and AOTAutograd, the parts that could drop a tangent; inductor runs in `rcm bench step`)."""
    task = ToyTask()
    teacher = task.build_teacher()
    eager = init_state(teacher, LOSS, OPTIM, OPTIM, seed=0, device=CPU)
    compiled = init_state(copy.deepcopy(teacher), LOSS, OPTIM, OPTIM, seed=0, device=CPU, compile="aot_eager")
    task_c = copy.deepcopy(task)
    seen = set()
    for _ in range(LOSS.scm.tangent_warmup + 2):  # warmup sCM steps, then an rCM student step and a critic step
        logs_e, logs_c = _steps(eager, task, 1)[0], _steps(compiled, task_c, 1)[0]
        assert logs_e.keys() == logs_c.keys()
        seen |= {key for key in logs_e if key.startswith("loss_")}
        for key, value in logs_e.items():
            if key.startswith("loss_"):
                assert abs(value - logs_c[key]) <= 1e-4 * abs(value) + 1e-6, (key, value, logs_c[key])
        for a, b in zip(eager.student.parameters(), compiled.student.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert seen == {"loss_scm", "loss_dmd", "loss_critic"}
    with PhaseTimer(cuda=False) as timer:  # the compiled step reports the same phases
        _steps(compiled, task_c, 1)
    assert "optimizer" in timer.seconds()
