"""The distillation loop: phases, exact resume, non-finite handling, checkpoint safety (tiny random Wan)."""

import json

import pytest
import torch

from rcm.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from rcm.losses import DMDConfig, RCMConfig, SCMConfig
from rcm.models.wan import WanDiT, wan_config
from rcm.checkpoint import checkpointer
from rcm.train import (
    LoopConfig,
    NonFiniteError,
    OptimizerConfig,
    init_state,
    loop_callbacks,
    method_config,
    resume,
    run_loop,
)

LOSS = RCMConfig(scm=SCMConfig(tangent_warmup=2), dmd=DMDConfig(max_simulation_steps=2), student_update_freq=2)
OPTIM = OptimizerConfig(lr=1e-3, warmup=2)


class ToyTask:
    """Random latents and text embeddings from a generator whose state is saved with the run."""

    def __init__(self, batch_size=2, nan_samples=(), nan_iterations=()):
        self.generator = torch.Generator().manual_seed(123)
        self.batch_size = batch_size
        self.nan_samples, self.nan_iterations, self.calls = nan_samples, set(nan_iterations), 0

    def build_teacher(self):
        torch.manual_seed(0)
        net = WanDiT(wan_config("wan-tiny"))
        with torch.no_grad():  # a non-zero head so the teacher is not the zero function
            net.head.head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        return net

    def next_batch(self):
        x0 = torch.randn(self.batch_size, 4, 2, 4, 4, generator=self.generator)
        context = torch.randn(self.batch_size, 8, 32, generator=self.generator)
        if self.calls in self.nan_iterations:
            x0[list(self.nan_samples)] = float("nan")
        self.calls += 1
        return x0, context

    def negative_context(self, context):
        return torch.zeros_like(context)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.calls = state["calls"]


def _stop_after(n):
    """A callback that stops the loop after `n` iterations of this call (an interruption)."""
    done = []
    return lambda state, logs: done.append(1) or len(done) >= n


def _run(tmp_path, iterations, stop_after=None, resume_run=False, task=None, loss=LOSS, record=None):
    task = task or ToyTask()
    state = init_state(task.build_teacher(), loss, OPTIM, OPTIM, seed=7, device=torch.device("cpu"))
    record = record or {"fingerprint": "toy", "ema_sigma_rel": 0.1}
    if resume_run:
        assert resume(state, task, checkpointer(tmp_path / "checkpoints"), record) is not None
    loop = LoopConfig(iterations=iterations, checkpoint_every=1, log_every=1)
    callbacks = loop_callbacks(state, task, tmp_path, record, loop)
    run_loop(state, task, loss, loop, callbacks + ([_stop_after(stop_after)] if stop_after else []))
    return state


def _logs(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _strip(logs):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in logs]


def test_phases_and_resume_is_exact(tmp_path):
    straight = _run(tmp_path / "a", 9)
    phases = [e["phase"] for e in _logs(tmp_path / "a")]
    # warmup 2 → student, student; then freq 2 → student, critic, student, critic, ...
    assert phases == ["student", "student", "student", "critic", "student", "critic", "student", "critic", "student"]
    assert "loss_dmd" in _logs(tmp_path / "a")[2] and "loss_dmd" not in _logs(tmp_path / "a")[1]

    _run(tmp_path / "b", 9, stop_after=4)
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1].name == "step_00000004.pt"
    resumed = _run(tmp_path / "b", 9, resume_run=True)
    assert _strip(_logs(tmp_path / "b")) == _strip(_logs(tmp_path / "a"))
    for (name, p), q in zip(straight.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(p, q)
    # training moved the student away from the teacher and the EMA tracks it
    diff = sum((p - q).abs().sum() for p, q in zip(straight.student.parameters(), straight.teacher.parameters()))
    assert diff > 0


def test_resume_refuses_a_different_run(tmp_path):
    _run(tmp_path, 2)
    task = ToyTask()
    state = init_state(task.build_teacher(), LOSS, OPTIM, OPTIM, seed=7, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="different settings"):
        resume(state, task, checkpointer(tmp_path / "checkpoints"), {"fingerprint": "other"})


def test_nan_sample_leaves_other_samples_gradients_unchanged(tmp_path):
    """A NaN in one sample is zeroed by the per-sample guards: the step still happens."""
    loss = method_config("scm", LOSS)
    clean = _run(tmp_path / "clean", 1, task=ToyTask(batch_size=1), loss=loss)
    # batch of 2 where sample 1 is NaN and sample 0 equals the clean run's only sample
    task = ToyTask(batch_size=2, nan_samples=(1,), nan_iterations=(0,))
    gen = torch.Generator().manual_seed(123)
    x_first = torch.randn(1, 4, 2, 4, 4, generator=gen)
    ctx_first = torch.randn(1, 8, 32, generator=gen)
    task.next_batch = lambda: (torch.cat([x_first, torch.full_like(x_first, float("nan"))]), ctx_first.repeat(2, 1, 1))
    mixed = _run(tmp_path / "mixed", 1, task=task, loss=loss)
    log = _logs(tmp_path / "mixed")[0]
    assert "skipped" not in log and log["scm_nonfinite"] == 1
    for p, q in zip(clean.student.parameters(), mixed.student.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    loss = method_config("scm", LOSS)
    bad = ToyTask(nan_samples=(0, 1), nan_iterations=(1,))
    state = _run(tmp_path / "skip", 3, task=bad, loss=loss)
    logs = _logs(tmp_path / "skip")
    assert [bool(e.get("skipped")) for e in logs] == [False, True, False] and state.skipped_steps == 1

    always_bad = ToyTask(nan_samples=(0, 1), nan_iterations=range(100))
    task_state = init_state(always_bad.build_teacher(), loss, OPTIM, OPTIM, seed=7, device=torch.device("cpu"))
    loop = LoopConfig(iterations=10, checkpoint_every=1, log_every=1, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        run_loop(task_state, always_bad, loss, loop,
                 loop_callbacks(task_state, always_bad, tmp_path / "stop", {"fingerprint": "toy"}, loop))
    assert task_state.iteration == 2  # the third bad step raised before advancing


def test_methods():
    assert method_config("scm", LOSS).dmd_enabled is False
    dmd2 = method_config("dmd2", LOSS)
    assert dmd2.scm.loss_scale == 0 and dmd2.scm.tangent_warmup == 0 and dmd2.dmd_enabled
    with pytest.raises(ValueError, match="method"):
        method_config("gan", LOSS)


def test_checkpoint_files_are_atomic_and_fall_back(tmp_path):
    folder = tmp_path / "ck"
    for step in (1, 2, 3):
        save_checkpoint(folder, step, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000002.pt", "step_00000003.pt"]
    assert load_latest(folder)[0] == {"step": 3}
    # a truncated newest file: fall back to the previous good one
    newest = list_checkpoints(folder)[-1]
    newest.write_bytes(newest.read_bytes()[:10])
    assert load_latest(folder)[0] == {"step": 2}
    # a checkpoint newer than `latest` (its pointer update never happened) is ignored
    save_checkpoint(folder, 4, {"step": 4}, keep=5)
    (folder / "latest").write_text("step_00000002.pt")
    assert load_latest(folder)[0] == {"step": 2}
    for p in list_checkpoints(folder):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest(folder)
    assert load_latest(tmp_path / "empty") is None


def test_dmd2_runs_no_jvp(tmp_path, monkeypatch):
    import rcm.losses.objectives as rcm_losses

    def no_scm(*a, **k):
        raise AssertionError("DMD2 must not run the sCM loss")

    monkeypatch.setattr(rcm_losses, "scm_loss", no_scm)
    _run(tmp_path, 3, loss=method_config("dmd2", LOSS))
    logs = _logs(tmp_path)
    assert [e["phase"] for e in logs] == ["student", "critic", "student"]
    assert "loss_dmd" in logs[0] and "loss_scm" not in logs[0]


def _torchrun_distill(out_dir, teacher, iterations):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rcm", "distill", "--teacher", str(teacher), "--out-dir", str(out_dir),  # -m rcm: as the docs launch it
           "--batch-size", "2", "--loop.iterations", str(iterations), "--loop.checkpoint-every", "2",
           "--loop.log-every", "1", "--no-report", "--threads", "1",
           "--loss.scm.tangent-warmup", "2", "--loss.student-update-freq", "2"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_torchrun_distill_is_sharded_and_resumes_exactly(tmp_path):
    """`torchrun --nproc-per-node 2 cli.py distill ...`: FSDP2 over 2 gloo ranks, DCP checkpoints, and a
    resumed run ends bit-identical to an uninterrupted one."""
    from safetensors.torch import load_file

    from rcm.digits.model import build_model, save_model

    teacher = build_model("digits-dit-tiny")
    torch.nn.init.normal_(teacher.dit.head.head.weight, std=0.05, generator=torch.Generator().manual_seed(3))
    save_model(teacher, tmp_path / "teacher.safetensors", {"kind": "teacher"})
    _torchrun_distill(tmp_path / "straight", tmp_path / "teacher.safetensors", 5)
    _torchrun_distill(tmp_path / "interrupted", tmp_path / "teacher.safetensors", 3)
    out = _torchrun_distill(tmp_path / "interrupted", tmp_path / "teacher.safetensors", 5)
    assert out.count("resumed") == 1  # rank 0 speaks alone
    assert (tmp_path / "interrupted" / "checkpoints" / "step_00000004" / ".metadata").is_file()  # DCP folders
    phases = [e["phase"] for e in _logs(tmp_path / "straight")]
    assert phases == ["student", "student", "student", "critic", "student"]
    a = load_file(tmp_path / "straight" / "student_ema.safetensors")
    b = load_file(tmp_path / "interrupted" / "student_ema.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in teacher.state_dict().items())
