"""`rcm bench i2v`: image-to-video and two-expert Wan2.2 shapes on one GPU (issue 18's device acceptance).

Random weights, built on the meta device and materialized empty on the GPU in bf16 (``random_dit_on``:
two 14B experts never exist in fp32 or on the host). Three parts, each eager and ``torch.compile``d:

* ``sample-ti2v``: 4-step student sampling of a Wan2.2 TI2V-5B-shaped DiT at 480p (Wan2.2 VAE latent
  48 x 21 x 30 x 52, 8 190 tokens) with the first latent frame given (frame replacement, per-token
  timesteps); the given frame is checked to come back exact.
* ``sample-a14b``: 4-step student sampling of Wan2.2 I2V-A14B-shaped two experts (2 x 14B, ``y`` channels,
  boundary 0.9) at 480p (latent 16 x 21 x 60 x 104, 32 760 tokens); the steps go to high, high, low, low.
* ``step-ti2v``: one rCM student iteration and one critic iteration of the 5B shape with the first frame
  given (``first_latent_frame_condition``), phase by phase. Memory: four 5B networks with AdamW's fp32
  master weights and moments need ~170 GB (student and fake score 70 GB each: bf16 weights, fp32
  masters, two fp32 moments; teacher 10, fp32 EMA 20), more than one H200; ``--optimizer sgd`` (the
  default) steps the bf16 weights with plain SGD (no optimizer state), which leaves every network call,
  the JVP and both backward passes as in training. ``--optimizer adamw`` is the recipe's (for larger
  GPUs; the CPU test runs both).

Times are seconds after a warm-up run (which compiles); peak memory is the CUDA peak of the timed run.
``--config tiny`` runs the same code on miniature shapes (the CPU test). The results print as a table
and go to ``--out`` as JSON.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from rcm.bench.config import BenchI2VConfig
from rcm.bench.common import (
    WanShape, console as _console, device_name as _device_name, forward_flops, free as _free,
    gpu_settings as _gpu_settings, peak_gib as _peak_gib, phase_flops, random_dit_on, reset_peak as _reset_peak,
)  # fmt: skip
from rcm.models.wan import WAN_CONFIGS, WAN_EXPERT_BOUNDARIES
from rcm.timing import sync as _sync
from rcm.wan.pipeline import resolve_device


# (DiT config, height, width, VAE spatial factor) of each family, full size and in miniature
SHAPES = {
    "480p": {"ti2v": ("wan2.2-ti2v-5b", 480, 832, 16), "a14b": ("wan2.2-i2v-a14b", 480, 832, 8)},
    "tiny": {"ti2v": ("wan-tiny-ti2v", 64, 64, 16), "a14b": ("wan-tiny-i2v-experts", 64, 64, 8)},
}


def i2v_shape(cfg: BenchI2VConfig, family: str) -> WanShape:
    name, height, width, factor = SHAPES[cfg.config][family]
    return WanShape(WAN_CONFIGS[name], cfg.num_frames, height, width, spatial_factor=factor)


def _network(shape: WanShape, family: str, device, dtype, seed: int):
    """The bench's DiT: one, or two different experts switched at I2V-A14B's boundary."""
    from rcm.models import WanExperts

    if family == "ti2v":
        return random_dit_on(shape.config, device, dtype, seed).eval().requires_grad_(False)
    high, low = (random_dit_on(shape.config, device, dtype, seed + i) for i in (0, 1))
    return WanExperts(high, low, WAN_EXPERT_BOUNDARIES["wan2.2-i2v-a14b"]).eval().requires_grad_(False)


def _condition(shape: WanShape, family: str, device, dtype, generator):
    """The first frame given: its latent replacing frame 0 (TI2V), or ``y`` = mask ++ latent (A14B)."""
    from rcm.models.trigflow import FrameCondition
    from rcm.models.wan_image import first_frame_mask_channels, first_latent_frame_condition

    b, c, t, h, w = shape.latent
    latent = torch.randn(b, c, t, h, w, generator=generator, device=device)
    if family == "ti2v":
        return first_latent_frame_condition(latent)
    latent[:, :, 1:] = 0  # the latent of "image, then black frames" has content mostly in frame 0
    mask = first_frame_mask_channels(shape.num_frames, t).to(device).expand(b, -1, -1, h, w)
    return FrameCondition(inputs={"y": torch.cat([mask, latent], dim=1).to(dtype)})


def bench_sample_part(cfg: BenchI2VConfig, family: str, device, dtype, console, done=lambda r: None) -> dict:
    """4-step student sampling of one family, every mode: seconds, per step, peak memory, checks.
    ``done(result)`` after each mode (the caller writes what was measured so far)."""
    from rcm.parallel import compile_blocks
    from rcm.samplers import consistency_times
    from rcm.wan import presets
    from rcm.wan.pipeline import sample_wan_latent

    shape = i2v_shape(cfg, family)
    net = _network(shape, family, device, dtype, cfg.seed)
    c = shape.config
    g = torch.Generator(device).manual_seed(cfg.seed)
    context = torch.randn(1, c.text_len, c.text_dim, generator=g, device=device, dtype=dtype)
    condition = _condition(shape, family, device, dtype, g)
    noise = torch.randn(shape.latent, generator=g, device=device)
    calls: list[str] = []
    if family == "a14b":  # which expert runs each step (hooks on the experts)
        net.high_noise.register_forward_hook(lambda *_: calls.append("high"))
        net.low_noise.register_forward_hook(lambda *_: calls.append("low"))
    times = consistency_times(cfg.student_steps, sigma_max=presets.STUDENT_SIGMA_MAX)
    result = {"config": SHAPES[cfg.config][family][0], "latent": list(shape.latent),
              "tokens": shape.tokens, "parameters_billion": sum(p.numel() for p in net.parameters()) / 1e9,
              "forward_tflop": sum(forward_flops(shape).values()) / 1e12, "steps": cfg.student_steps,
              "rf_times": [round(float(torch.sin(t) / (torch.sin(t) + torch.cos(t))), 4) for t in times[:-1]],
              "modes": {}}
    console.print(f"[bold]{family}[/]: {result['config']}, {result['parameters_billion']:.3g}B parameters, latent "
                  f"{result['latent']}, {shape.tokens} tokens")
    for mode in cfg.modes:
        if mode == "compiled":
            compile_blocks(net, cfg.compile_backend)
        run = lambda progress=None: sample_wan_latent(  # noqa: E731
            net, context, noise, kind="student", steps=cfg.student_steps, generator=torch.Generator(device).manual_seed(0),
            condition=condition, progress=progress)
        with console.status(f"{family} {mode}: warm-up"):
            t0 = time.perf_counter()
            run()
            _sync(device)
            warmup = time.perf_counter() - t0
        _reset_peak(device)
        calls.clear()
        step_seconds, last = [], [time.perf_counter()]

        def tick(_step, _total):
            _sync(device)
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now

        _sync(device)
        t0 = last[0] = time.perf_counter()
        out = run(tick)
        _sync(device)
        seconds = time.perf_counter() - t0
        entry = {"seconds": seconds, "step_seconds": step_seconds, "warmup_seconds": warmup,
                 "peak_gib": _peak_gib(device), "finite": bool(torch.isfinite(out).all()),
                 "tflops": result["forward_tflop"] * cfg.student_steps / seconds}
        if family == "ti2v":  # frame replacement: the given frame comes back exact
            entry["given_frame_max_error"] = float((out[:, :, :1] - condition.latent[:, :, :1]).abs().max())
        else:
            entry["experts_per_step"] = list(calls)
        result["modes"][mode] = entry
        done(result)
    del net
    return result


class _ConditionedRandomTask:
    """Random latents and text (a fresh draw per batch), the first latent frame given (TI2V)."""

    def __init__(self, shape: WanShape, device, dtype, seed: int):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.generator = torch.Generator(device).manual_seed(seed)
        c = shape.config
        self.negative = torch.randn(1, c.text_len, c.text_dim, generator=self.generator, device=device, dtype=dtype)

    def next_batch(self):
        from rcm.models.wan_image import first_latent_frame_condition

        c = self.shape.config
        x0 = torch.randn(self.shape.latent, generator=self.generator, device=self.device)
        context = torch.randn(1, c.text_len, c.text_dim, generator=self.generator, device=self.device, dtype=self.dtype)
        return x0, context, first_latent_frame_condition(x0)

    def negative_context(self, context):
        return self.negative.expand(context.shape[0], -1, -1)


def _train_state(teacher, loss, cfg: BenchI2VConfig, mode: str, device, dtype):
    """The four networks; AdamW with fp32 masters (``init_state``, the recipe) or plain SGD on the bf16
    weights (no optimizer state: what fits one GPU at 5B)."""
    from rcm.train import OptimizerConfig, TrainState, init_state

    backend = cfg.compile_backend if mode == "compiled" else None
    if cfg.optimizer == "adamw":
        return init_state(copy.deepcopy(teacher), loss, OptimizerConfig(), OptimizerConfig(), cfg.seed, device,
                          dtype=dtype, compile=backend)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = copy.deepcopy(teacher).float()

    def sgd(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-6)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    (s_opt, s_sched), (c_opt, c_sched) = sgd(student), sgd(fake)
    return TrainState(student, teacher, fake, ema, s_opt, c_opt, s_sched, c_sched,
                      torch.Generator(device).manual_seed(cfg.seed), compile=backend)


def bench_step_part(cfg: BenchI2VConfig, device, dtype, console, done=lambda r: None) -> dict:
    """One rCM student and one critic iteration of the TI2V-5B shape with the first frame given;
    ``done(result)`` after each mode."""
    from rcm.bench.step import _iteration_with, _time_iteration
    from rcm.losses import RCM_PRESETS
    from rcm.parallel import apply_activation_checkpointing

    shape = i2v_shape(cfg, "ti2v")
    loss = RCM_PRESETS["wan2.1-t2v-1.3b"]
    teacher = random_dit_on(shape.config, device, dtype, cfg.seed).eval().requires_grad_(False)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(teacher)  # the student and fake score are copies
    student_k = _iteration_with(loss, "student", cfg.rollout_steps)
    critic_k = _iteration_with(loss, "critic", cfg.rollout_steps)
    flops = phase_flops(shape, cfg.rollout_steps, guidance=loss.scm.guidance > 1)
    result = {"config": SHAPES[cfg.config]["ti2v"][0], "latent": list(shape.latent), "tokens": shape.tokens,
              "optimizer": cfg.optimizer, "rollout_steps": cfg.rollout_steps, "modes": {}}
    for mode in cfg.modes:
        _free(device)
        state = _train_state(teacher, loss, cfg, mode, device, dtype)
        task = _ConditionedRandomTask(shape, device, dtype, cfg.seed)
        entry = {}
        with console.status(f"step-ti2v {mode}: warm-up iterations"):
            t0 = time.perf_counter()
            entry["first_losses"] = {kind: {k: v for k, v in _time_iteration(state, task, loss, it, device)[2].items()
                                            if k.startswith("loss_")}
                                     for kind, it in (("student", student_k), ("critic", critic_k))}
            entry["warmup_seconds"] = time.perf_counter() - t0
        _reset_peak(device)
        for kind, k in (("student", student_k), ("critic", critic_k)):
            wall, phases, _ = _time_iteration(state, task, loss, k, device)
            model_flops = sum(f for name, f in flops.items() if name in phases)
            entry[kind] = {"seconds": wall, "phases": phases, "tflops": model_flops / wall / 1e12}
        entry["peak_gib"] = _peak_gib(device)
        result["modes"][mode] = entry
        done(result)
        del state
    del teacher
    _free(device)
    return result


def bench_i2v(cfg: BenchI2VConfig) -> dict:
    """Run the parts, print the table, write ``cfg.out``; returns the results."""
    console = _console()
    device = resolve_device(cfg.device)
    _gpu_settings(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict = {"config": cfg.config, "device": _device_name(device), "torch": torch.__version__,
                     "dtype": str(dtype), "num_frames": cfg.num_frames, "parts": {}}

    def write():
        if cfg.out is not None:  # after every mode: a later failure or time-out keeps what was measured
            Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")

    for part in cfg.parts:
        _free(device)

        def done(result, part=part):
            results["parts"][part] = result
            write()
            mode, entry = list(result["modes"].items())[-1]  # a line per mode: the log keeps it if killed later
            brief = {k: v for k, v in entry.items() if k in ("seconds", "peak_gib", "warmup_seconds")}
            brief |= {k: v["seconds"] for k, v in entry.items() if isinstance(v, dict) and "seconds" in v}
            console.print(f"{part} {mode}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in brief.items()))

        try:
            if part == "step-ti2v":
                bench_step_part(cfg, device, dtype, console, done)
            else:
                bench_sample_part(cfg, part.split("-")[1], device, dtype, console, done)
        except Exception as e:  # e.g. out of memory: report it, keep the other parts' figures
            console.print(f"[red]{part} failed:[/] {type(e).__name__}: {' '.join(str(e).split())[:500]}")
            results.setdefault("errors", {})[part] = f"{type(e).__name__}: {e}"
        _free(device)
        write()
    _print_table(console, results)
    if not results["parts"]:
        raise RuntimeError(f"every part failed: {results['errors']}")
    return results


def _print_table(console, results: dict) -> None:
    from rich.table import Table

    table = Table(title=f"rcm bench i2v ({results['config']}, {results['device']}, {results['dtype']}, "
                        f"{results['num_frames']} frames)")
    for column in ("part", "mode", "tokens", "seconds", "per step / phase", "TFLOP/s", "peak GiB", "check"):
        table.add_column(column, justify="left" if column in ("part", "mode", "check") else "right")
    for part, r in results["parts"].items():
        for mode, m in r["modes"].items():
            peak = "" if m["peak_gib"] is None else f"{m['peak_gib']:.1f}"
            if part.startswith("sample"):
                check = (f"given frame err {m['given_frame_max_error']:.0e}" if "given_frame_max_error" in m
                         else "experts " + ",".join(m["experts_per_step"]))
                steps = " ".join(f"{s:.2f}" for s in m["step_seconds"])
                table.add_row(part, mode, str(r["tokens"]), f"{m['seconds']:.2f}", steps, f"{m['tflops']:.0f}", peak,
                              check)
            else:
                for kind in ("student", "critic"):
                    top = sorted(m[kind]["phases"].items(), key=lambda kv: -kv[1])[:3]
                    table.add_row(f"{part} {kind}", mode, str(r["tokens"]), f"{m[kind]['seconds']:.2f}",
                                  ", ".join(f"{n} {s:.2f}" for n, s in top), f"{m[kind]['tflops']:.0f}", peak,
                                  f"optimizer {r['optimizer']}")
    console.print(table)
    for part, error in results.get("errors", {}).items():
        console.print(f"[red]{part}[/]: {error[:300]}")
