"""`rcm bench step` and `rcm bench sample`: the full rCM training step and few-step sampling of a Wan2.1 DiT.

Random weights (no checkpoint needed), one GPU, bf16. Everything compared is measured in the same process:

* **step**: one rCM *student* iteration (teacher CFG forwards, the no-grad JVP pass, the student's grad
  forward and backward, the DMD rollout, fake-score and teacher forwards, the DMD backward, the optimizer
  step and EMA) and one *critic* iteration, phase by phase (``rcm.timing``), eager and ``torch.compile``d
  side by side, with peak memory and model-FLOP utilization against a bf16 matmul timed in the same run.
  Before timing, the compiled JVP tangent and student output are checked against eager on the same inputs.
* **sample**: seconds per video for 1/2/4-step student sampling and 50-step CFG teacher sampling, DiT only
  and with the VAE decode.

Model FLOPs are counted analytically (matmuls only; elementwise work is not counted):

    forward F      = linear 2·N·P_lin + self-attention 4·B·H·L²·D + cross-attention 4·B·H·L·L_text·D (per layer)
    JVP pass       = 2× linear + 3× self-attention (12·BHL²D) + 2× cross-attention (the text has no tangent)
    backward       = 2 F (activation-checkpointing recomputation is not counted, as MFU conventions go)
    student step   = teacher CFG 2F + JVP + F + 2F (sCM) + n F + 2F (rollout with grad on the last step)
                     + 3F (fake score, teacher CFG)                                    n: rollout steps
    critic step    = n F (rollout) + F + 2F (fake score forward and backward)
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from rcm.models.wan import WAN_CONFIGS, WanConfig, WanDiT
from rcm.parallel import ParallelConfig
from rcm.sample import resolve_device

WanModel = Literal["wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan-tiny"]
Mode = Literal["eager", "compiled"]
WAN_FRAME_RATE_DIVISOR = 4  # the VAE's causal temporal factor: frames = 1 + 4 (T − 1)


@dataclass(frozen=True)
class WanShape:
    """A Wan2.1 video size and its latent / token counts."""

    config: WanConfig
    num_frames: int
    height: int
    width: int
    batch_size: int = 1

    @property
    def latent(self) -> tuple[int, int, int, int, int]:
        return (self.batch_size, self.config.in_dim, 1 + (self.num_frames - 1) // 4, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        return math.prod(self.latent[2:]) // self.config.patch_numel


def wan_shape(model: str, resolution: str, num_frames: int, height: int | None = None, width: int | None = None,
              batch_size: int = 1) -> WanShape:
    """Checked size of a benchmark: explicit height/width or a resolution (16:9)."""
    from rcm.sample import video_size

    config = WAN_CONFIGS[model]
    if (height is None) != (width is None):
        raise ValueError("give both --height and --width, or neither")
    if height is None:
        height, width = video_size(resolution, "16:9")
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"--num-frames must be 1 + 4k (1, 5, ..., 81), got {num_frames}")
    step = 8 * config.patch_size[1]
    for name, size in (("height", height), ("width", width)):
        if size < step or size % step:
            raise ValueError(f"--{name} must be a positive multiple of {step}, got {size}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    return WanShape(config, num_frames, height, width, batch_size)


def forward_flops(shape: WanShape) -> dict[str, float]:
    """Matmul FLOPs of one DiT forward, split into linear / self-attention / cross-attention."""
    c, n, b = shape.config, shape.tokens, shape.batch_size
    d, t = c.dim, c.text_len
    per_token = 4 * d * d + 2 * d * d + 2 * d * c.ffn_dim  # multiply-adds: self q,k,v,o; cross q,o; FFN
    per_text_token = 2 * d * d  # cross k,v
    embeddings = (t * (c.text_dim * d + d * d) + n * d * c.patch_numel * (c.in_dim + c.out_dim)  # text, patch, head
                  + c.freq_dim * d + d * d + d * 6 * d)  # time embedding and projection
    linear = 2 * b * (c.num_layers * (n * per_token + t * per_text_token) + embeddings)
    self_attn = 4 * b * c.num_layers * n * n * d  # H·D = dim
    cross_attn = 4 * b * c.num_layers * n * t * d
    return {"linear": float(linear), "self_attention": float(self_attn), "cross_attention": float(cross_attn)}


def phase_flops(shape: WanShape, rollout_steps: int, guidance: bool = True) -> dict[str, float]:
    """Model FLOPs of each phase of a student and a critic iteration (see the module docstring)."""
    f = forward_flops(shape)
    F = sum(f.values())
    jvp = 2 * f["linear"] + 3 * f["self_attention"] + 2 * f["cross_attention"]
    cfg = 2 if guidance else 1
    return {
        "scm.teacher": cfg * F, "scm.jvp": jvp, "scm.student_forward": F, "scm.backward": 2 * F,
        "dmd.rollout": rollout_steps * F, "dmd.scores": (1 + cfg) * F, "dmd.backward": 2 * F,
        "critic.rollout": rollout_steps * F, "critic.forward": F, "critic.backward": 2 * F,
    }


def random_dit(config: WanConfig, seed: int = 0, device: torch.device | str = "cpu") -> WanDiT:
    """A DiT (fp32, on the CPU) with the official init and a non-zero random head (the official zero head
    would make every output, tangent and gradient downstream of it trivially zero). Initialized on
    ``device`` (fast on a GPU), returned on the CPU."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        net = WanDiT(config)
    net.init_weights(generator)
    with torch.no_grad():
        net.head.head.weight.normal_(0, 0.02, generator=generator)
    return net.cpu()



def _gpu_settings(device: torch.device) -> None:
    if device.type == "cuda":  # TF32 for the few fp32 matmuls (time embedding), as the reference trainer
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------------------------
# bench step


@dataclass
class BenchStepConfig:
    """Time one rCM student iteration and one critic iteration of a Wan2.1 DiT, eager and compiled."""

    model: WanModel = "wan2.1-t2v-1.3b"
    resolution: Literal["480p", "720p"] = "480p"
    num_frames: int = 81
    height: int | None = None  # explicit size (overrides --resolution), a multiple of 16
    width: int | None = None
    batch_size: int = 1
    modes: tuple[Mode, ...] = ("eager", "compiled")
    repeats: int = 2  # timed iterations of each kind, after one warm-up (compile) iteration
    rollout_steps: int = 2  # DMD rollout length of the timed iterations (training cycles 1..4)
    activation_checkpointing: bool = True  # recompute each block in the backward (needed to fit 480p/81 frames)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    profile: Path | None = None  # write a Chrome trace of one compiled student iteration here, print top kernels
    json_path: Path | None = None  # write the results as JSON
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of the compiled mode
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """under torchrun: FSDP2 / CP layout (--parallel.cp 2 ...); activation checkpointing follows the flag above."""
    compare: Path | None = None
    """a JSON of an earlier run (e.g. one GPU) to compare with: first-iteration losses, step times, scaling."""

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if not 1 <= self.rollout_steps <= 4:
            raise ValueError(f"--rollout-steps must be in 1..4 (max_simulation_steps), got {self.rollout_steps}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"--modes must name eager and/or compiled once each, got {self.modes}")


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
    lost or changed by the compiled modules (DESIGN fact 3), and F checks the compiled forward."""
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
    from rcm.bench_attention import matmul_tflops
    from rcm.losses import RCM_PRESETS
    from rcm.parallel import apply_activation_checkpointing
    from rcm.train import OptimizerConfig

    console = _console()
    shape = wan_shape(cfg.model, cfg.resolution, cfg.num_frames, cfg.height, cfg.width, cfg.batch_size)
    mesh, parallel = None, replace(cfg.parallel, activation_checkpointing=cfg.activation_checkpointing)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: FSDP2 (+ CP) over all ranks
        from rcm.parallel import init_distributed

        if "compiled" in cfg.modes:
            raise ValueError("--modes: compiled runs in one process only for now (regional compile is untested "
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
        _print_comparison(console, results, json.loads(Path(cfg.compare).read_text()))
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


def _console():
    """A rich console; wide when writing to a file or pipe (logs of device runs), so tables stay whole."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


# ------------------------------------------------------------------------------------------------------------
# bench sample


@dataclass
class BenchSampleConfig:
    """Seconds per video: 1/2/4-step student sampling and 50-step CFG teacher sampling, DiT only and with
    the VAE decode (random weights)."""

    model: WanModel = "wan2.1-t2v-1.3b"
    resolution: Literal["480p", "720p"] = "480p"
    num_frames: int = 81
    height: int | None = None
    width: int | None = None
    student_steps: tuple[int, ...] = (1, 2, 4)
    teacher_steps: int = 50
    guidance: float = 5.0
    modes: tuple[Mode, ...] = ("eager", "compiled")
    decode: bool = True  # also time the VAE decode (random real-size Wan VAE)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    json_path: Path | None = None
    seed: int = 0
    compile_backend: str = "inductor"  # torch.compile backend of the compiled mode

    def __post_init__(self):
        if not self.student_steps or any(not 1 <= s <= 4 for s in self.student_steps):
            raise ValueError(f"--student-steps must be in 1..4, got {self.student_steps}")
        if self.teacher_steps < 1:
            raise ValueError(f"--teacher-steps must be >= 1, got {self.teacher_steps}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"--modes must name eager and/or compiled once each, got {self.modes}")


def bench_sample(cfg: BenchSampleConfig) -> dict:
    """Run the sampling benchmark, print the table, return the results."""
    from rich.table import Table

    from rcm.parallel import compile_blocks
    from rcm.sample import decode_videos, sample_wan_latent

    console = _console()
    device = resolve_device(cfg.device)
    _gpu_settings(device)
    shape = wan_shape(cfg.model, cfg.resolution, cfg.num_frames, cfg.height, cfg.width)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    console.print(f"[bold]rcm bench sample[/]: {cfg.model}, {shape.num_frames} frames {shape.height}x{shape.width}, "
                  f"{shape.tokens} tokens, {dtype}, {device}")
    dit = random_dit(shape.config, cfg.seed, device).to(device=device, dtype=dtype).eval().requires_grad_(False)
    c = shape.config
    g = torch.Generator(device).manual_seed(cfg.seed)
    context = torch.randn(1, c.text_len, c.text_dim, generator=g, device=device, dtype=dtype)
    negative = torch.randn(1, c.text_len, c.text_dim, generator=g, device=device, dtype=dtype)
    noise = torch.randn(shape.latent, generator=g, device=device)
    vae = None
    if cfg.decode:
        from rcm.models.vae import WanVAE

        vae = WanVAE().to(device=device, dtype=dtype).eval().requires_grad_(False)
    runs = [(f"student {n} step{'s' if n > 1 else ''}", dict(kind="student", num_steps=n)) for n in cfg.student_steps]
    runs.append((f"teacher {cfg.teacher_steps} steps CFG {cfg.guidance:g}",
                 dict(kind="teacher", steps=cfg.teacher_steps, guidance=cfg.guidance, negative_context=negative)))
    results: dict = {"model": cfg.model, "tokens": shape.tokens, "device": _device_name(device),
                     "torch": torch.__version__, "modes": {}}
    latent = None
    for mode in cfg.modes:
        if mode == "compiled":
            compile_blocks(dit, cfg.compile_backend)
        net = dit
        rows = {}
        # warm-up (compile): a 2-step student and a 2-step guided teacher
        t0 = time.perf_counter()
        sample_wan_latent(net, context, noise, kind="student", num_steps=2, generator=torch.Generator().manual_seed(0))
        sample_wan_latent(net, context, noise, kind="teacher", steps=2, guidance=cfg.guidance,
                          negative_context=negative, generator=torch.Generator().manual_seed(0))
        _sync(device)
        warmup = time.perf_counter() - t0
        for label, kwargs in runs:
            with console.status(f"{mode}: {label}"):
                _sync(device)
                t0 = time.perf_counter()
                latent = sample_wan_latent(net, context, noise, generator=torch.Generator().manual_seed(0), **kwargs)
                _sync(device)
                rows[label] = {"dit_seconds": time.perf_counter() - t0}
        results["modes"][mode] = {"warmup_seconds": warmup, "runs": rows}
    if vae is not None:
        _sync(device)
        decode_videos(vae, latent)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        decode_videos(vae, latent)
        _sync(device)
        results["vae_decode_seconds"] = time.perf_counter() - t0
    teacher_label = runs[-1][0]
    decode = results.get("vae_decode_seconds")
    table = Table(title=f"Sampling one video, {cfg.model}, {shape.num_frames} frames {shape.height}x{shape.width}"
                        + (f"; VAE decode {decode:.2f} s" if decode is not None else ""))
    table.add_column("sampler")
    for mode in cfg.modes:
        table.add_column(f"{mode} DiT s", justify="right")
        table.add_column(f"{mode} ×teacher", justify="right")
        if decode is not None:
            table.add_column(f"{mode} +VAE s", justify="right")
    for label, _ in runs:
        cells = []
        for mode in cfg.modes:
            r = results["modes"][mode]["runs"]
            s = r[label]["dit_seconds"]
            r[label]["speedup_vs_teacher"] = r[teacher_label]["dit_seconds"] / s
            cells += [f"{s:.2f}", f"{r[label]['speedup_vs_teacher']:.1f}"]
            if decode is not None:
                r[label]["with_decode_seconds"] = s + decode
                cells.append(f"{s + decode:.2f}")
        table.add_row(label, *cells)
    console.print(table)
    if cfg.json_path is not None:
        Path(cfg.json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results
