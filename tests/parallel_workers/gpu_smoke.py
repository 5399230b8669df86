"""GPU (NCCL) smoke run of rcm.parallel, any number of GPUs (cp = 2 from 2 GPUs on):

    torchrun --standalone --nproc-per-node N tests/parallel_workers/gpu_smoke.py

fp32 sharded student iteration (tangent, losses, gradients) and DiT checks against the plain model on
one GPU; bf16 mixed precision against the bf16 model; a DCP save/load round trip. Prints relative
errors; exits non-zero past the tolerances.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel_workers import common  # noqa: E402

from rcm.checkpoint.dcp import load_train_state, save_train_state  # noqa: E402
from rcm.parallel import (  # noqa: E402
    ParallelConfig, build_mesh, gathered_for_jvp, init_distributed, parallelize, shard_train_state)
from rcm.train import init_state, train_step  # noqa: E402

failures = []


def _errors(name, got, ref):
    if isinstance(ref, dict):
        return [e for k in ref for e in _errors(f"{name}/{k}", got[k], ref[k])]
    err = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    return [(err, name)]


def check(name, got, ref, tol):
    """Print the worst relative error under ``name``; record every entry past ``tol``."""
    errors = _errors(name, got, ref)
    worst = max(errors)
    print(f"rank {dist.get_rank()} {name}: worst rel {worst[0]:.2e} at {worst[1]} (tol {tol:g})", flush=True)
    failures.extend(n for e, n in errors if e > tol)


def main():
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    cp = 2 if world >= 2 else 1
    kind = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script (gloo)
    init_distributed(ParallelConfig(cp=cp), kind)
    dev = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
    name = torch.cuda.get_device_name() if kind == "cuda" else "cpu"
    print(f"rank {dist.get_rank()}/{world} torch {torch.__version__} {name}", flush=True)

    mesh = build_mesh(ParallelConfig(cp=cp, param_dtype="float32", activation_checkpointing=True), kind)
    ref = common.student_step(*(m.to(dev) for m in common.models()), device=dev)
    for gather in (None, gathered_for_jvp):  # FSDP's all-gather inside torch.func.jvp, or before it
        label = "gathered" if gather else "plain"
        try:
            models = [m.to(dev) for m in common.models()]
            for m in models:
                parallelize(m, mesh)
            got = common.student_step(*models, device=dev, gathered=gather is not None)
            check(f"fp32 rcm {label}", got, ref, 1e-4)  # GPU reductions differ in order
            dit = parallelize(common.teacher().to(dev), mesh)
            with gather(dit) if gather else contextlib.nullcontext():
                got = common.dit_checks(dit, dev)
            check(f"fp32 dit {label}", got, common.dit_checks(common.teacher().to(dev), dev), 1e-4)
        except Exception:
            print(f"rank {dist.get_rank()} {label} FAILED:\n{traceback.format_exc()[-2500:]}", flush=True)
            failures.append(label)

    mesh_bf16 = build_mesh(ParallelConfig(cp=cp, param_dtype="bfloat16"), kind)
    x, timestep, context, x_dot, t_dot, _ = common.dit_inputs(device=dev)
    plain, sharded = common.teacher().to(dev).to(torch.bfloat16), parallelize(common.teacher().to(dev), mesh_bf16)
    with torch.no_grad(), gathered_for_jvp(sharded):
        jvps = [torch.func.jvp(lambda x, t: m(x, t, context), (x, timestep), (x_dot, t_dot)) for m in (sharded, plain)]
    check("bf16 out", jvps[0][0], jvps[1][0], 2e-2)
    check("bf16 tangent", jvps[0][1], jvps[1][1], 5e-2)

    state = init_state(common.teacher(), common.LOSS, common.OPTIM, common.OPTIM, seed=7, device=dev)
    shard_train_state(state, mesh)
    task = common.Task()
    for _ in range(3):
        with gathered_for_jvp(state.student):
            train_step(state, _OnDevice(task, dev), common.LOSS, ema_gamma=6.94, max_nonfinite=3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        obj = [str(path)]
        dist.broadcast_object_list(obj, src=0)
        save_train_state(obj[0], state, mesh)
        before = common.snapshot(state)
        fresh = init_state(common.teacher(), common.LOSS, common.OPTIM, common.OPTIM, seed=1, device=dev)
        shard_train_state(fresh, mesh)
        load_train_state(obj[0], fresh, mesh)
        after = common.snapshot(fresh)
        dist.barrier()
    if dist.get_rank() == 0:
        for k in ("student", "ema", "fake_score"):
            check(f"dcp {k}", after[k], before[k], 0.0)
    dist.barrier()
    print(f"rank {dist.get_rank()} {'FAILED ' + str(failures) if failures else 'OK'}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if failures else 0)


class _OnDevice:
    def __init__(self, task, device):
        self.task, self.device = task, device

    def next_batch(self):
        return tuple(v.to(self.device) for v in self.task.next_batch())

    def negative_context(self, context):
        return torch.zeros_like(context)


if __name__ == "__main__":
    main()
