"""rcm.parallel: FSDP2, Ulysses context parallelism, activation checkpointing and DCP checkpoints,
composed with torch.func.jvp (CPU, gloo, tiny Wan DiT, fp32).

Two torchrun launches of tests/parallel_workers/worker.py (2 processes each) carry every
multi-process case; the single-process references are computed here from the same deterministic
builders (tests/parallel_workers/common.py):

    launch 1  FSDP rCM iteration (AC off/on), gradient sync, mixed precision, CP=2 (AC off/on),
              3 training iterations → DCP save (2 processes) → one more iteration
    here      load that checkpoint in 1 process (no process group), continue, save again
    launch 2  load the 1-process checkpoint on 2 processes, continue
"""
from __future__ import annotations

import copy
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from rcm.models.wan import WanDiT, wan_config
from rcm.checkpoint.dcp import (
    export_checkpoint,
    list_sharded_checkpoints,
    load_latest_sharded_checkpoint,
    load_train_state,
    save_sharded_checkpoint,
    save_train_state,
)
from rcm.parallel import ParallelConfig, apply_activation_checkpointing, grads_finite, mixed_precision_policy
from rcm.train import init_state, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_workers import common  # noqa: E402

WORKER = Path(__file__).resolve().parent / "parallel_workers" / "worker.py"
RTOL = 1e-5
LAUNCH_TIMEOUT_S = 240


def launch(*args: str, nproc: int = 2) -> None:
    """torchrun (free port: --standalone) in its own session; killed as a group on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: one process group we own
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {args[0]} timed out after {LAUNCH_TIMEOUT_S}s:\n{output[-6000:]}")
    if proc.returncode:
        pytest.fail(f"torchrun {args[0]} failed (exit {proc.returncode}):\n{output[-6000:]}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(got, ref, name: str = "", rtol: float = RTOL) -> None:
    """Every tensor of ``got`` within ``rtol`` (relative L2) of ``ref``; nested dicts compared per key."""
    if isinstance(ref, dict):
        assert set(got) == set(ref), f"{name}: keys differ"
        for key in ref:
            assert_close(got[key], ref[key], f"{name}/{key}", rtol)
        return
    if not torch.is_tensor(ref):
        assert got == ref, f"{name}: {got!r} != {ref!r}"
        return
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.dtype == torch.uint8:  # RNG states
        assert torch.equal(got, ref), f"{name}: differs"
        return
    assert ref.abs().max() > 0 or got.abs().max() == 0, f"{name}: all zero reference"
    error = rel(got, ref)
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:g}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
    spinning threads slow them down tenfold (the torchrun workers run with OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The launches and the single-process leg, once per test session: under pytest-xdist the workers
    share one run through a lock and a folder above their own temporary folders."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's own root
    out = shared / "rcm_parallel"
    with FileLock(str(shared / "rcm_parallel.lock")):
        if not (out / "done").is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            _run_all(out)
            (out / "done").touch()
    return out, {p.stem: torch.load(p, weights_only=False) for p in out.glob("*.pt")}


def _run_all(out: Path) -> None:
    """Launch 1, the single-process leg of the checkpoint round trip, launch 2."""
    launch("train", str(out))

    # 2 → 1: load the 2-process checkpoint into plain single-process models (no process group).
    task = common.Task()
    state = _plain_state()
    extra, path = load_latest_sharded_checkpoint(out / "run_2proc", state)
    assert path.name == "step_00000003"
    task.load_state_dict(extra)
    torch.save(common.snapshot(state), out / "single_loaded.pt")
    _steps(state, task, 1)
    torch.save(common.snapshot(state), out / "single_continued.pt")
    save_train_state(out / "ckpt_1proc", state, extra=task.state_dict())
    torch.save(common.snapshot(state), out / "single_saved.pt")
    _steps(state, task, 2)
    torch.save(common.snapshot(state), out / "single_continued_2.pt")

    # 1 → 2
    launch("resume", str(out), str(out / "ckpt_1proc"))


def _plain_state():
    return init_state(common.teacher(), common.LOSS, common.OPTIM, common.OPTIM, seed=7, device=torch.device("cpu"))


def _steps(state, task, n):
    for _ in range(n):
        logs = train_step(state, task, common.LOSS, ema_gamma=6.94, max_nonfinite=3)
        assert not logs.get("skipped"), logs


@pytest.fixture(scope="module")
def reference():
    return common.student_step(*common.models())


# ------------------------------------------------------------------------------------------------
# Acceptance 1: FSDP2 (2 processes) equals one process; gradients are really reduced.


def test_fsdp_rcm_student_iteration_equals_single_process(runs, reference):
    _, results = runs
    got = results["fsdp"]
    assert set(got["losses"]) == {"scm", "dmd"}  # a full rCM student iteration, JVP included
    assert_close(got["tangent"], reference["tangent"], "tangent")
    assert_close(got["losses"], reference["losses"], "losses")
    assert_close(got["grads"], reference["grads"], "grads")
    assert_close(got["gathered"], reference, "parameters gathered before the JVP pass")


def test_fsdp_dit_outputs_and_tangents_with_and_without_no_grad(runs):
    _, results = runs
    got, ref = results["fsdp"]["dit"], common.dit_checks(common.teacher())
    for key in ("out", "tangent_nograd", "tangent_grad", "jvp_primal", "grads"):
        assert_close(got[key], ref[key], key)


@pytest.mark.parametrize("case", ["fsdp_grad_sync", "hsdp_grad_sync"])
def test_gradients_are_averaged_over_ranks(runs, case):
    """Different data per rank (sharded FSDP, and replicate-only HSDP = DDP-like)."""
    _, results = runs
    got = results[case]
    per_rank = [common.student_step(*common.models(), data_seed=10 + r)["grads"] for r in (0, 1)]
    mean = {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in per_rank[0]}
    assert_close(got["grads"], mean, "synced grads")
    # The check has teeth: rank 0's own gradient is far from the mean (a skipped sync would show).
    key = "blocks.0.self_attn.q.weight"
    assert rel(per_rank[0][key], mean[key]) > 1e-2
    assert got["finite"] is True
    assert got["after_nan"] is False  # a NaN in one rank's shard stops the step on every rank


def test_fsdp_mixed_precision_computes_in_bf16_with_fp32_inputs(runs):
    _, results = runs
    got = results["mixed_precision"]
    assert got["param_dtype"] == "torch.float32"  # sharded master weights stay fp32
    model = common.teacher().to(torch.bfloat16)  # the same network computing in bf16
    x, timestep, context = common.dit_inputs()[:3]
    with torch.no_grad():
        ref = model(x, timestep, context)
    assert_close(got["out"], ref, "bf16 output", rtol=1e-6)
    fp32 = common.teacher()(x, timestep, context).detach()
    assert rel(got["out"], fp32) > 1e-4  # it really ran in bf16


def test_meta_device_init_and_rank0_broadcast_load(runs):
    _, results = runs
    x, timestep, context = common.dit_inputs()[:3]
    with torch.no_grad():
        ref = common.teacher()(x, timestep, context)
    assert_close(results["meta_init"]["out"], ref, "meta init", rtol=0)


def test_mixed_precision_policy():
    cfg = ParallelConfig()
    gpu, cpu = mixed_precision_policy(cfg, "cuda"), mixed_precision_policy(cfg, "cpu")
    assert gpu.param_dtype == torch.bfloat16 and gpu.reduce_dtype == torch.float32
    assert cpu.param_dtype is None and cpu.reduce_dtype == torch.float32
    assert not gpu.cast_forward_inputs and not cpu.cast_forward_inputs


# ------------------------------------------------------------------------------------------------
# Acceptance 2: Ulysses CP = 2 equals the unsharded run.


@pytest.mark.parametrize("case", ["cp", "cp_ac"])
def test_context_parallel_dit_outputs_tangents_and_gradients(runs, case):
    _, results = runs
    got = results[case]["dit"]
    ref = common.dit_checks(common.teacher())
    for key in ("out", "tangent_nograd", "tangent_grad", "jvp_primal"):
        assert_close(got[key], ref[key], key)
    assert_close(got["grads"], ref["grads"], "grads")


@pytest.mark.parametrize("case", ["cp", "cp_ac"])
def test_context_parallel_rcm_student_iteration(runs, reference, case):
    _, results = runs
    got = results[case]["rcm"]
    assert_close(got["tangent"], reference["tangent"], "tangent")
    assert_close(got["losses"], reference["losses"], "losses")
    assert_close(got["grads"], reference["grads"], "grads")


def test_context_parallel_compiles_fullgraph_for_the_grad_pass(runs):
    _, results = runs
    got, ref = results["cp"]["compiled"], common.dit_checks(common.teacher())
    assert_close(got["out"], ref["out"], "compiled out")
    assert_close(got["grads"], ref["grads"], "compiled grads")


def test_context_parallel_wan_variant_per_token_time_and_image_conditioning(runs):
    _, results = runs
    got, ref = results["cp"]["variant"], common.variant_checks(common.variant_teacher())
    for key in ("out", "tangent", "grads"):
        assert_close(got[key], ref[key], key)


def test_context_parallel_rejects_indivisible_sequence(runs):
    _, results = runs
    message = results["cp"]["odd_sequence_error"]
    assert message is not None and "not divisible by the CP size 2" in message


# ------------------------------------------------------------------------------------------------
# Acceptance 3: activation checkpointing on and off.


def test_activation_checkpointing_fsdp_same_losses_and_gradients(runs):
    _, results = runs
    for key in ("tangent", "losses", "grads"):
        assert_close(results["fsdp_ac"][key], results["fsdp"][key], f"fsdp AC vs no AC: {key}", rtol=1e-6)


def test_activation_checkpointing_single_process():
    plain = common.student_step(*common.models())
    teacher, student, fake = common.models()
    keys = list(student.state_dict())
    for m in (teacher, student, fake):
        apply_activation_checkpointing(m)
    assert list(student.state_dict()) == keys  # no wrapper modules, same names
    assert_close(common.student_step(teacher, student, fake), plain, "AC", rtol=1e-6)
    # the JVP pass with gradients on (checkpointing active inside torch.func.jvp), and outputs
    dit = apply_activation_checkpointing(common.teacher())
    assert_close(common.dit_checks(dit), common.dit_checks(common.teacher()), "AC dit", rtol=1e-6)


def test_activation_checkpointing_recomputes_and_survives_deepcopy():
    dit = apply_activation_checkpointing(WanDiT(wan_config("wan-tiny")))
    calls = []
    for block in dit.blocks:
        block.ffn.register_forward_hook(lambda *a: calls.append(1))
    x, timestep, context = common.dit_inputs()[:3]
    dit(x, timestep, context).sum().backward()
    assert len(calls) == 2 * len(dit.blocks)  # forward + recomputation in backward
    copied = copy.deepcopy(dit)
    assert copied.blocks[0].forward.__self__ is copied.blocks[0]  # bound to the copy, not the original


# ------------------------------------------------------------------------------------------------
# Acceptance 4: DCP save with 2 processes, load with 1, and back; training continues identically.


def test_checkpoint_2_to_1_process(runs):
    _, results = runs
    assert results["train_saved"]["iteration"] == 3
    assert_close(results["single_loaded"], results["train_saved"], "loaded (1 proc)", rtol=0)
    # one more iteration (a student iteration with sCM + DMD) in 1 process = in 2 processes
    assert_close(results["single_continued"], results["train_continued"], "continued", rtol=RTOL)


def test_checkpoint_1_to_2_processes(runs):
    _, results = runs
    assert_close(results["resume_loaded"], results["single_saved"], "loaded (2 procs)", rtol=0)
    # a critic and a student iteration on 2 processes after loading = in 1 process
    assert results["resume_continued"]["iteration"] == results["single_continued_2"]["iteration"] == 6
    assert_close(results["resume_continued"], results["single_continued_2"], "continued", rtol=RTOL)


def test_export_safetensors(runs):
    out, results = runs
    from safetensors.torch import load_file

    online = load_file(out / "ema.safetensors")  # written by the 2 sharded processes
    offline = load_file(export_checkpoint(out / "run_2proc" / "step_00000003", out / "ema_offline.safetensors"))
    assert_close(online, results["train_saved"]["ema"], "online export", rtol=0)
    assert_close(offline, results["train_saved"]["ema"], "offline export", rtol=0)
    WanDiT(wan_config("wan-tiny")).load_state_dict(offline, strict=True)  # official keys, complete
    with pytest.raises(ValueError, match="no tensors of model 'teacher'"):
        export_checkpoint(out / "run_2proc" / "step_00000003", out / "x.safetensors", model="teacher")


def test_checkpoint_before_any_critic_step_resumes_exactly(tmp_path):
    """An optimizer that never stepped is saved as such (DCP's get_state_dict would initialize it)."""
    task = common.Task()
    state = _plain_state()
    _steps(state, task, 1)  # a student iteration: the critic optimizer is still empty
    save_train_state(tmp_path / "ckpt", state, extra=task.state_dict())
    _steps(state, task, 2)  # student (sCM + DMD), then the first critic step
    straight = common.snapshot(state)

    resumed, task2 = _plain_state(), common.Task()
    task2.load_state_dict(load_train_state(tmp_path / "ckpt", resumed))
    assert len(resumed.critic_optimizer.state) == 0
    _steps(resumed, task2, 2)
    assert_close(common.snapshot(resumed), straight, "resumed", rtol=0)


# ------------------------------------------------------------------------------------------------
# Config and helpers (single process).


def test_sharded_checkpoint_folder(tmp_path):
    """step_N folders, the latest pointer, pruning, and a stray incomplete save ignored."""
    task, state = common.Task(), _plain_state()
    folder = tmp_path / "checkpoints"
    assert load_latest_sharded_checkpoint(folder, state) is None
    for _ in range(3):
        _steps(state, task, 1)
        save_sharded_checkpoint(folder, state, extra={"iteration": state.iteration}, keep=2)
    assert [p.name for p in list_sharded_checkpoints(folder)] == ["step_00000002", "step_00000003"]
    (folder / ".step_00000004.tmp").mkdir()  # a save killed mid-way
    (folder / "step_00000005").mkdir()  # no .metadata: never completed
    fresh = _plain_state()
    extra, path = load_latest_sharded_checkpoint(folder, fresh)
    assert path.name == "step_00000003" and extra == {"iteration": 3} and fresh.iteration == 3


def test_parallel_config_resolve_and_errors():
    assert ParallelConfig(cp=2).resolve(8).dp_shard == 4
    assert ParallelConfig(dp_replicate=2, dp_shard=2, cp=2).resolve(8).dp_shard == 2
    with pytest.raises(ValueError, match="not divisible"):
        ParallelConfig(cp=3).resolve(8)
    with pytest.raises(ValueError, match="!= world size"):
        ParallelConfig(dp_shard=2, cp=2).resolve(8)
    with pytest.raises(ValueError, match="cp must be an int >= 1"):
        ParallelConfig(cp=0)
    with pytest.raises(ValueError, match="param_dtype"):
        ParallelConfig(param_dtype="fp16")


def test_grads_finite_without_process_group():
    dit = WanDiT(wan_config("wan-tiny"))
    assert grads_finite(dit)  # no gradients at all
    x, timestep, context = common.dit_inputs()[:3]
    dit(x, timestep, context).sum().backward()
    assert grads_finite(dit)
    dit.blocks[1].ffn[0].weight.grad[0, 0] = float("inf")
    assert not grads_finite(dit)
