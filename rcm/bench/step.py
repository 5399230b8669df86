"""`rcm bench step`: the full rCM training step of a Wan2.1 DiT, phase by phase, eager vs compiled.

Random weights (no checkpoint needed), one GPU, bf16. One rCM *student* iteration (teacher CFG forwards,
the no-grad JVP pass, the student's grad forward and backward, the DMD rollout, fake-score and teacher
forwards, the DMD backward, the optimizer step and EMA) and one *critic* iteration, phase by phase
(``rcm.timing``), eager and ``torch.compile``d side by side, with peak memory and model-FLOP utilization
against a bf16 matmul timed in the same run. Before timing, the compiled JVP tangent and student output
are checked against eager on the same inputs. FLOP counts: ``rcm.bench.common``.
"""

from __future__ import annotations

import copy
import json
import time
import os
from dataclasses import replace
from pathlib import Path

import torch

from rcm import ConfigError, PathArgumentError
from rcm.bench.config import BenchStepConfig
import torch.distributed as dist

from rcm.bench.common import (
    WanShape, console as _console, device_name as _device_name, free as _free,
    gpu_settings as _gpu_settings, peak_gib as _peak_gib, phase_flops, random_dit, reset_peak as _reset_peak, wan_shape,
)  # fmt: skip
from rcm.models.wan import WanDiT
from rcm.parallel import ParallelConfig
from rcm.timing import sync as _sync
from rcm.wan.pipeline import resolve_device

# ------------------------------------------------------------------------------------------------------------
# bench step


def read_comparison(path: Path) -> dict:
    """The results JSON of an earlier `rcm bench step` (``--compare``); anything else is an error naming it."""
    try:
        ref = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PathArgumentError("compare", f"no file at {path}") from e
    except (OSError, ValueError) as e:  # a folder, unreadable, not UTF-8, not JSON
        raise ConfigError("compare", f"{path} is not a readable JSON file ({type(e).__name__})") from e
    if not isinstance(ref, dict) or not isinstance(ref.get("modes"), dict):
        raise ConfigError("compare", f"{path} is not the results JSON of `rcm bench step --json-path` (no 'modes')")
    return ref


class _RandomTask:
    """Random latents and text embeddings (a fresh draw per batch; timing does not depend on content)."""

    def __init__(self, shape: WanShape, device: torch.device, dtype: torch.dtype, seed: int):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.generator = torch.Generator(device).manual_seed(seed)
        c = shape.config
        self.negative = torch.randn(shape.batch_size, c.text_len, c.text_dim, generator=self.generator,
                                    device=device, dtype=dtype)

    def next_batch(self):
        c = self.shape.config
        x0 = torch.randn(self.shape.latent, generator=self.generator, device=self.device)
        context = torch.randn(self.shape.batch_size, c.text_len, c.text_dim, generator=self.generator,
                              device=self.device, dtype=self.dtype)
        return x0, context

    def negative_context(self, context):
        return self.negative


def _iteration_with(loss, kind: str, rollout_steps: int) -> int:
    """The first iteration after the tangent warmup that is a `kind` iteration with `rollout_steps` rollout steps."""
    from rcm.losses import critic_iteration_count, rcm_phase, rollout_steps as steps_of, student_iteration_count

    w, freq, top = loss.scm.tangent_warmup, loss.student_update_freq, loss.dmd.max_simulation_steps
    for k in range(w, w + 8 * freq * top):
        if rcm_phase(k, loss) != kind:
            continue
        counter = student_iteration_count(k, w, freq) if kind == "student" else critic_iteration_count(k, w, freq)
        if steps_of(counter, top) == rollout_steps:
            return k
    raise ValueError(f"no {kind} iteration with {rollout_steps} rollout steps")


def _check_compiled(state, task, device) -> dict:
    """Compiled vs eager on identical inputs and weights: the JVP tangent c s dF/dt and the student's F
    (relative L2; the reference runs the same modules with ``torch.compiler.set_stance("force_eager")``).
    The JVP goes through blocks that step aside to eager inside ``torch.func``; the check catches a tangent
    lost or changed by the compiled modules (docs/design.md fact 3), and F checks the compiled forward."""
    from rcm.losses import scm_jvp
    from rcm.models.trigflow import trigflow_denoise

    student, _, _, jvp = state.networks()
    g = torch.Generator(device).manual_seed(1234)
    x0, context = task.next_batch()
    x_t = torch.randn(x0.shape, generator=g, device=device, dtype=torch.float64)
    t = torch.full((x0.shape[0],), 0.9, dtype=torch.float64, device=device)
    F_teacher = torch.randn(x0.shape, generator=g, device=device, dtype=torch.float64)
    with torch.no_grad():
        compiled_tangent = jvp(x_t, t, context, F_teacher)
        compiled_F = trigflow_denoise(student, x_t, t, context).F
        with torch.compiler.set_stance("force_eager"):  # the same modules, compiled blocks bypassed
            eager_tangent = scm_jvp(student, x_t, t, context, F_teacher)
            eager_F = trigflow_denoise(student, x_t, t, context).F

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {"tangent_rel_err": rel(compiled_tangent, eager_tangent), "tangent_norm": eager_tangent.norm().item(),
            "F_rel_err": rel(compiled_F, eager_F)}


def _time_iteration(state, task, loss, iteration: int, device) -> tuple[float, dict[str, float], dict]:
    from rcm.losses import power_ema_gamma
    from rcm.timing import PhaseTimer
    from rcm.train import train_step

    state.iteration = iteration
    _sync(device)
    start = time.perf_counter()
    with PhaseTimer(cuda=device.type == "cuda") as timer:
        logs = train_step(state, task, loss, power_ema_gamma(0.1), max_nonfinite=10**9)
    _sync(device)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # a sharded iteration ends when its slowest rank's does
    return time.perf_counter() - start, timer.seconds(), logs


def bench_step(cfg: BenchStepConfig) -> dict:
    """Run the benchmark, print the table, return the results."""
    if cfg.compare is not None:
        read_comparison(cfg.compare)  # before minutes of benchmarking, not after
    from rcm.bench.attention import matmul_tflops
    from rcm.losses import RCM_PRESETS
    from rcm.parallel import apply_activation_checkpointing
    from rcm.train import OptimizerConfig

    console = _console()
    shape = wan_shape(cfg.model, cfg.resolution, cfg.num_frames, cfg.height, cfg.width, cfg.batch_size)
    mesh, parallel = None, replace(cfg.parallel, activation_checkpointing=cfg.activation_checkpointing)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: FSDP2 (+ CP) over all ranks
        from rcm.parallel import init_distributed

        if "compiled" in cfg.modes:
            raise ConfigError("modes", "compiled runs in one process only for now (regional compile is untested "
                             "with FSDP2); pass --modes eager under torchrun")
        mesh = init_distributed(parallel)
        device = torch.device(mesh.device_type, torch.cuda.current_device() if mesh.device_type == "cuda" else 0)
        console.quiet = dist.get_rank() != 0
    else:
        device = resolve_device(cfg.device)
    _gpu_settings(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loss = RCM_PRESETS.get(cfg.model, RCM_PRESETS["wan2.1-t2v-1.3b"])
    layout = "" if mesh is None else f", {dist.get_world_size()} ranks (FSDP {mesh.dp_size} x CP {mesh.cp_size})"
    console.print(f"[bold]rcm bench step[/]: {cfg.model}, {shape.num_frames} frames {shape.height}x{shape.width}, "
                  f"latent {list(shape.latent)}, {shape.tokens} tokens, {dtype}, {device}{layout}"
                  f"{', activation checkpointing' if cfg.activation_checkpointing else ''}")
    peak_tflops = matmul_tflops(device) if device.type == "cuda" else matmul_tflops(device, 512, 200)
    flops = phase_flops(shape, cfg.rollout_steps, guidance=loss.scm.guidance > 1)
    student_k = _iteration_with(loss, "student", cfg.rollout_steps)
    critic_k = _iteration_with(loss, "critic", cfg.rollout_steps)

    if mesh is None or dist.get_rank() == 0:
        teacher = random_dit(shape.config, cfg.seed, device)
    else:  # the other ranks receive their shards from rank 0
        with torch.device("meta"):
            teacher = WanDiT(shape.config)
    if cfg.activation_checkpointing and mesh is None:  # (sharded: parallelize applies it)
        apply_activation_checkpointing(teacher)  # student and fake score are copies; no-grad passes skip it
    results: dict = {"world": 1 if mesh is None else dist.get_world_size(),
                     "cp": 1 if mesh is None else mesh.cp_size, "model": cfg.model, "tokens": shape.tokens, "latent": list(shape.latent),
                     "height": shape.height, "width": shape.width, "num_frames": shape.num_frames,
                     "rollout_steps": cfg.rollout_steps, "matmul_tflops": peak_tflops, "device": _device_name(device),
                     "torch": torch.__version__, "phase_flops": flops, "modes": {}}
    optim = OptimizerConfig()
    for mode in cfg.modes:
        _free(device)
        try:
            results["modes"][mode] = out = _bench_mode(cfg, mode, teacher, loss, optim, shape, dtype, device,
                                                       student_k, critic_k, console, mesh, parallel)
            console.print(f"{mode}: student iteration {out['student']['seconds']:.2f} s "
                          f"{ {k: round(v, 3) for k, v in out['student']['phases'].items()} }, critic "
                          f"{out['critic']['seconds']:.2f} s, peak {out['peak_gib']} GiB, warm-up "
                          f"{out['warmup_seconds']:.0f} s")
        except Exception as e:  # e.g. out of memory, or a compile failure: report it, keep the other mode's figures
            if mesh is not None:  # the other ranks would wait in a collective for ever
                raise
            console.print(f"[red]{mode} failed:[/] {type(e).__name__}: {' '.join(str(e).split())[:500]}")
            results.setdefault("errors", {})[mode] = f"{type(e).__name__}: {e}"
        _free(device)
    if not results["modes"]:
        raise RuntimeError(f"every mode failed: {results['errors']}")
    _summarize(results, flops)
    _print_step(console, results)
    if cfg.compare is not None:
        _print_comparison(console, results, read_comparison(cfg.compare))
    if cfg.json_path is not None and (mesh is None or dist.get_rank() == 0):
        Path(cfg.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _bench_mode(cfg: BenchStepConfig, mode: str, teacher, loss, optim, shape: WanShape, dtype, device,
                student_k: int, critic_k: int, console, mesh=None, parallel: ParallelConfig | None = None) -> dict:
    """Warm up, check (compiled) and time one mode; returns its figures."""
    from rcm.train import init_state

    if mesh is None:
        state = init_state(copy.deepcopy(teacher), loss, optim, optim, cfg.seed, device, dtype=dtype,
                           compile=cfg.compile_backend if mode == "compiled" else None)
    else:  # built on meta, sharded, filled from rank 0's weights (fp32 masters; FSDP computes in bf16 on GPU)
        from rcm.parallel import materialize_train_state, shard_train_state

        with torch.device("meta"):
            skeleton = WanDiT(shape.config)
        state = init_state(skeleton, loss, optim, optim, cfg.seed, device, dtype=torch.float32)
        shard_train_state(state, mesh, parallel)
        materialize_train_state(state, teacher.state_dict() if dist.get_rank() == 0 else None, device)
    task = _RandomTask(shape, device, dtype, cfg.seed)
    out: dict = {}
    if mode == "compiled":
        t0 = time.perf_counter()
        out["check"] = _check_compiled(state, task, device)
        out["check_seconds"] = time.perf_counter() - t0
        console.print(f"compiled vs eager: JVP tangent rel. error {out['check']['tangent_rel_err']:.2e} "
                      f"(norm {out['check']['tangent_norm']:.3g}), F {out['check']['F_rel_err']:.2e}")
    with console.status(f"{mode}: warm-up iterations (compile)"):
        t0 = time.perf_counter()
        # the first iterations' losses: the same draws and weights in every run, so runs compare
        out["first_losses"] = {kind: {k: v for k, v in _time_iteration(state, task, loss, it, device)[2].items()
                                      if k.startswith("loss_")}
                               for kind, it in (("student", student_k), ("critic", critic_k))}
        out["warmup_seconds"] = time.perf_counter() - t0
    _reset_peak(device)
    for kind, k in (("student", student_k), ("critic", critic_k)):
        walls, phases = [], {}
        for _ in range(cfg.repeats):
            wall, seconds, _ = _time_iteration(state, task, loss, k, device)
            walls.append(wall)
            for name, s in seconds.items():
                phases.setdefault(name, []).append(s)
        out[kind] = {"seconds": min(walls), "all_seconds": walls,
                     "phases": {n: min(v) for n, v in phases.items()}}
    out["peak_gib"] = _peak_gib(device)
    if mesh is not None:  # every rank's peak; the largest is the one that must fit
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, out["peak_gib"])
        out["peak_gib_per_rank"], out["peak_gib"] = peaks, max(p or 0 for p in peaks) or None
    if mode == "compiled" and cfg.profile is not None:
        out["top_kernels"] = _profile(state, task, loss, student_k, device, cfg.profile)
    return out


def _summarize(results: dict, flops: dict) -> None:
    """Totals, MFU, the JVP / forward ratio and the compile speed-up, in place."""
    peak = results["matmul_tflops"]
    for out in results["modes"].values():
        for kind in ("student", "critic"):
            r = out[kind]
            # per GPU: with CP each rank computes 1/cp of a sample; with data parallelism a sample of its own
            r["flops"] = sum(f for name, f in flops.items() if name in r["phases"]) / results.get("cp", 1)
            r["tflops"] = r["flops"] / r["seconds"] / 1e12
            r["mfu"] = r["tflops"] / peak
        p = out["student"]["phases"]
        # a plain forward of the same network: the teacher's CFG pass is two of them
        out["jvp_over_forward"] = p["scm.jvp"] / (p["scm.teacher"] / 2)
    modes = results["modes"]
    if "eager" in modes and "compiled" in modes:
        results["compile_speedup"] = {kind: modes["eager"][kind]["seconds"] / modes["compiled"][kind]["seconds"]
                                      for kind in ("student", "critic")}
        peaks = [modes[m]["peak_gib"] for m in ("eager", "compiled")]
        if None not in peaks and peaks[0] > 0:  # compiled blocks once dropped activation checkpointing: 2.2x
            results["compiled_over_eager_peak"] = peaks[1] / peaks[0]


def _print_step(console, results: dict) -> None:
    from rich.table import Table

    modes = results["modes"]
    table = Table(title=f"rCM iteration, {results['model']}, {results['tokens']} tokens, rollout "
                        f"{results['rollout_steps']} steps; bf16 matmul {results['matmul_tflops']:.0f} TFLOP/s")
    table.add_column("phase")
    for mode in modes:
        table.add_column(f"{mode} s", justify="right")
        table.add_column(f"{mode} TFLOP/s", justify="right")
    if len(modes) == 2:
        table.add_column("eager/compiled", justify="right")
    flops = results["phase_flops"]

    def row(label, values):
        cells = []
        for v, f in values:
            cells += ["" if v is None else f"{v:.3f}", "" if v is None or not f else f"{f / v / 1e12:.0f}"]
        vs = [v for v, _ in values]
        if len(modes) == 2:
            cells.append(f"{vs[0] / vs[1]:.2f}x" if None not in vs and vs[1] > 0 else "")
        table.add_row(label, *cells)

    for kind in ("student", "critic"):
        for name in dict.fromkeys(n for out in modes.values() for n in out[kind]["phases"]):
            row(f"  {name}", [(out[kind]["phases"].get(name), flops.get(name, 0)) for out in modes.values()])
        row(f"[bold]{kind} iteration[/]", [(out[kind]["seconds"], out[kind]["flops"]) for out in modes.values()])
    console.print(table)
    for mode, out in modes.items():
        peak = f"{out['peak_gib']:.1f} GiB" if out["peak_gib"] is not None else "n/a"
        console.print(f"{mode}: MFU student {out['student']['mfu']:.1%}, critic {out['critic']['mfu']:.1%}; "
                      f"JVP pass / plain forward {out['jvp_over_forward']:.2f}x; peak memory {peak}; "
                      f"warm-up {out['warmup_seconds']:.0f} s")
    if "compile_speedup" in results:
        s = results["compile_speedup"]
        console.print(f"torch.compile speed-up: student iteration {s['student']:.2f}x, critic {s['critic']:.2f}x")
    if "compiled_over_eager_peak" in results:
        console.print(f"peak memory, compiled / eager: {results['compiled_over_eager_peak']:.2f}x")


def _print_comparison(console, results: dict, ref: dict) -> None:
    """This run against an earlier one (``--compare``): first-iteration losses (the same weights and draws),
    iteration times, and scaling efficiency = per-GPU sample throughput over the reference's,
    (cp_ref · t_ref) / (cp · t)."""
    for mode, out in results["modes"].items():
        base = ref.get("modes", {}).get(mode)
        if base is None:
            continue
        for kind in ("student", "critic"):
            diffs = {k: abs(v - base["first_losses"][kind][k]) / max(abs(base["first_losses"][kind][k]), 1e-30)
                     for k, v in out["first_losses"][kind].items() if k in base["first_losses"][kind]}
            t, t_ref = out[kind]["seconds"], base[kind]["seconds"]
            efficiency = ref.get("cp", 1) * t_ref / (results.get("cp", 1) * t)
            console.print(f"{mode} {kind} vs {ref.get('world', 1)} rank(s): {t:.3f} s against {t_ref:.3f} s, "
                          f"scaling efficiency {efficiency:.0%}; first-iteration loss relative differences "
                          + ", ".join(f"{k} {d:.1e}" for k, d in diffs.items()))
        results.setdefault("comparison", {})[mode] = {"reference_world": ref.get("world", 1)}


def _profile(state, task, loss, iteration: int, device, path: Path, top: int = 15) -> list[dict]:
    """One iteration under torch.profiler: Chrome trace to `path`, the `top` kernels by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _time_iteration(state, task, loss, iteration, device)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and not e.key.startswith("rcm.")]
    if device.type == "cuda":  # kernels only: an operator's device time is also its kernels' (no double count)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                   and e.key != "Command Buffer Full"]  # a CUPTI marker, not a kernel
        events = kernels or events
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in events)
    rows = [{"kernel": e.key[:90], "ms": getattr(e, attr) / 1e3, "share": getattr(e, attr) / total, "calls": e.count}
            for e in events[:top]]
    for r in rows:
        print(f"{r['share']:6.1%} {r['ms']:9.1f} ms {r['calls']:6d}  {r['kernel']}")
    return rows


