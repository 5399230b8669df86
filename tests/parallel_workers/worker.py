"""Multi-process side of tests/test_parallel.py, launched with torchrun (gloo, CPU, tiny Wan DiT).

    torchrun --standalone --nproc-per-node 2 tests/parallel_workers/worker.py train OUT
    torchrun --standalone --nproc-per-node 2 tests/parallel_workers/worker.py resume OUT CKPT REF

Each case's results are torch.save'd by rank 0 into OUT/<case>.pt; failures raise (non-zero exit).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from parallel_workers import common  # noqa: E402

from rcm.models.wan import WanDiT, wan_config  # noqa: E402
from rcm.checkpoint.dcp import export_safetensors, load_train_state, save_sharded_checkpoint  # noqa: E402
from rcm.parallel import (  # noqa: E402
    ParallelConfig,
    apply_context_parallel,
    broadcast_from_cp_leader,
    build_mesh,
    gathered_for_jvp,
    grads_finite,
    init_distributed,
    load_full_model_state_dict,
    parallelize,
    rank_seed,
    shard_train_state,
)
from rcm.train import init_state, train_step  # noqa: E402

FSDP = ParallelConfig(dp_shard=2)
FSDP_AC = dataclasses.replace(FSDP, activation_checkpointing=True)
HSDP = ParallelConfig(dp_replicate=2, dp_shard=1)  # pure replication (DDP-like) through FSDP2
CP = ParallelConfig(dp_shard=1, cp=2)
CP_AC = dataclasses.replace(CP, activation_checkpointing=True)


def save(out: Path, name: str, value) -> None:
    if dist.get_rank() == 0:
        torch.save(value, out / f"{name}.pt")


def sharded_models(cfg: ParallelConfig):
    mesh = build_mesh(cfg, "cpu")
    teacher, student, fake = common.models()
    for m in (teacher, student, fake):
        parallelize(m, mesh)
    return mesh, teacher, student, fake


def case_fsdp(out: Path, cfg: ParallelConfig, name: str) -> None:
    """Acceptance 1 and 3: the rCM student iteration on identical data on every rank; outputs and
    JVPs (no-grad and grad-enabled) of a sharded DiT."""
    mesh, teacher, student, fake = sharded_models(cfg)
    result = common.student_step(teacher, student, fake, data_seed=0)
    result["dit"] = common.dit_checks(parallelize(common.teacher(), mesh))
    # The same iteration with every parameter gathered before the JVP pass (the torch 2.11 + CUDA
    # route, see gathered_for_jvp), on fresh models; all resharded afterwards.
    _, teacher, student, fake = sharded_models(cfg)
    result["gathered"] = common.student_step(teacher, student, fake, data_seed=0, gathered=True)
    assert all(isinstance(p, DTensor) for p in student.parameters()), "resharded after the block"
    save(out, name, result)


def case_grad_sync(out: Path, cfg: ParallelConfig, name: str) -> None:
    """Acceptance 1: different data per rank; the synced gradient is the mean over ranks."""
    _, teacher, student, fake = sharded_models(cfg)
    result = common.student_step(teacher, student, fake, data_seed=10 + dist.get_rank())
    finite = grads_finite(student)
    param = student.blocks[0].ffn[0].weight
    if dist.get_rank() == 1:  # a non-finite gradient in one rank's shard only
        param.grad.to_local()[0, 0] = float("nan")
    save(out, name, {"grads": result["grads"], "finite": finite, "after_nan": grads_finite(student)})


def case_meta_init(out: Path) -> None:
    """A model built on the meta device, sharded, materialized, and given the teacher's weights from
    rank 0 only: the way a 14B teacher is loaded."""
    mesh = build_mesh(FSDP, "cpu")
    with torch.device("meta"):
        dit = WanDiT(wan_config("wan-tiny"))
    parallelize(dit, mesh)
    dit.to_empty(device="cpu")
    full = common.teacher().state_dict() if dist.get_rank() == 0 else None
    load_full_model_state_dict(dit, full, broadcast_from_rank0=True)
    x, timestep, context = common.dit_inputs()[:3]
    with torch.no_grad():
        save(out, "meta_init", {"out": dit(x, timestep, context)})


def case_mixed_precision(out: Path) -> None:
    """bf16 compute through FSDP's mixed precision: the same as the bf16 model (timestep, modulation
    and RoPE stay fp32: FSDP must not cast forward inputs)."""
    mesh = build_mesh(dataclasses.replace(FSDP, param_dtype="bfloat16"), "cpu")
    dit = parallelize(common.teacher(), mesh)
    x, timestep, context = common.dit_inputs()[:3]
    with torch.no_grad():
        save(out, "mixed_precision", {"out": dit(x, timestep, context),
                                      "param_dtype": str(next(dit.parameters()).dtype)})


def case_cp(out: Path, cfg: ParallelConfig, name: str) -> None:
    """Acceptance 2: DiT outputs, JVP tangents and gradients with the sequence split over cp ranks,
    then the rCM student iteration with all three networks context-parallel."""
    mesh, teacher, student, fake = sharded_models(cfg)
    assert mesh.cp_size == 2 and rank_seed(7, mesh) == 7  # one data-parallel rank: the same seed
    mine = torch.full((3,), float(dist.get_rank()))
    broadcast_from_cp_leader(mesh, mine)
    assert mine.eq(0).all(), "the CP group's first rank's tensor everywhere"
    dit = common.teacher()
    parallelize(dit, mesh)
    result = {"dit": common.dit_checks(dit), "rcm": common.student_step(teacher, student, fake)}
    _, timestep, context = common.dit_inputs()[:3]
    try:  # patch grid 1x1x3: 3 tokens, not divisible by cp = 2
        dit(torch.zeros(2, 4, 1, 2, 6), timestep, context)
        result["odd_sequence_error"] = None
    except ValueError as e:
        result["odd_sequence_error"] = str(e)
    if not cfg.activation_checkpointing:
        result["compiled"] = compiled_cp(mesh)
        result["variant"] = variant_cp(mesh)
    save(out, name, result)


def compiled_cp(mesh) -> dict:
    """The grad pass of a context-parallel DiT under torch.compile(fullgraph=True): the collectives
    trace as functional collectives (no graph break). Gradients summed over the CP group by hand
    (no FSDP here)."""
    dit = apply_context_parallel(common.teacher(), mesh.cp_group)
    x, timestep, context, _, _, weight = common.dit_inputs()
    out = torch.compile(dit, backend="aot_eager", fullgraph=True)(x, timestep, context)
    (out * weight).sum().backward()
    grads = common.grads(dit)
    for g in grads.values():
        dist.all_reduce(g, group=mesh.cp_group)
    return {"out": out.detach(), "grads": grads}


def variant_cp(mesh) -> dict:
    """An I2V DiT with per-token timesteps, context-parallel (no FSDP: CP gradients summed by hand)."""
    dit = apply_context_parallel(common.variant_teacher(), mesh.cp_group)
    result = common.variant_checks(dit)
    for g in result["grads"].values():
        dist.all_reduce(g, group=mesh.cp_group)
    return result


def build_state(mesh):
    task = common.Task()
    state = init_state(task.build_teacher(), common.LOSS, common.OPTIM, common.OPTIM, seed=7,
                       device=torch.device("cpu"))
    shard_train_state(state, mesh)
    return state, task


def steps(state, task, n: int) -> None:
    for _ in range(n):
        with gathered_for_jvp(state.student):  # as the loop should run it (docs/parallel.md)
            logs = train_step(state, task, common.LOSS, ema_gamma=6.94, max_nonfinite=3)
        assert not logs.get("skipped"), logs
        assert grads_finite(state.student)


def case_train(out: Path) -> None:
    """Acceptance 4, first half: train 3 iterations (2 student, 1 critic) with identical data on both
    ranks, save with DCP, export the EMA, train one more."""
    mesh = build_mesh(FSDP, "cpu")
    state, task = build_state(mesh)
    steps(state, task, 3)
    save_sharded_checkpoint(out / "run_2proc", state, mesh, extra=task.state_dict())
    save(out, "train_saved", common.snapshot(state))
    export_safetensors(state.ema, out / "ema.safetensors")
    steps(state, task, 1)
    save(out, "train_continued", common.snapshot(state))


def case_resume(out: Path, checkpoint: Path) -> None:
    """Acceptance 4, second half: load a 1-process checkpoint on 2 processes, train one iteration."""
    mesh = build_mesh(FSDP, "cpu")
    state, task = build_state(mesh)
    extra = load_train_state(checkpoint, state, mesh)
    if dist.get_rank() == 0:
        assert extra is not None
    else:  # a data-parallel rank that did not exist: a fresh, derived random stream
        assert extra is None
    streams = [None, None]
    dist.all_gather_object(streams, state.generator.get_state())
    assert not torch.equal(streams[0], streams[1]), "rank 1 must not repeat rank 0's random stream"
    save(out, "resume_loaded", common.snapshot(state))
    # The check of continued training uses rank 0's stream and data on both ranks (the single-process
    # continuation it is compared with saw one stream); the optimizer, EMA and schedule come from DCP.
    shared = [extra, streams[0]]
    dist.broadcast_object_list(shared, src=0)
    task.load_state_dict(shared[0])
    state.generator.set_state(shared[1])
    steps(state, task, 2)
    save(out, "resume_continued", common.snapshot(state))


def main() -> None:
    command, out = sys.argv[1], Path(sys.argv[2])
    init_distributed(FSDP, "cpu")
    if command == "train":
        cases = [(case_fsdp, FSDP, "fsdp"), (case_fsdp, FSDP_AC, "fsdp_ac"),
                 (case_grad_sync, FSDP, "fsdp_grad_sync"), (case_grad_sync, HSDP, "hsdp_grad_sync"),
                 (case_mixed_precision,), (case_meta_init,), (case_cp, CP, "cp"), (case_cp, CP_AC, "cp_ac"),
                 (case_train,)]
        for case, *args in cases:
            start = time.perf_counter()
            case(out, *args)
            if os.environ.get("RCM_TIMING") and dist.get_rank() == 0:
                print(f"{case.__name__} {args[-1:]} {time.perf_counter() - start:.1f}s", flush=True)
    elif command == "resume":
        case_resume(out, Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
