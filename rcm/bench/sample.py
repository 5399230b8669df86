"""`rcm bench sample`: seconds per video of 1/2/4-step student sampling and 50-step CFG teacher sampling of
a Wan2.1 DiT (random weights), DiT only and with the VAE decode, eager vs compiled."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from rcm.bench.config import BenchSampleConfig

from rcm.bench.common import console as _console, device_name as _device_name, gpu_settings as _gpu_settings, random_dit, wan_shape
from rcm.timing import sync as _sync
from rcm.wan.pipeline import resolve_device

# ------------------------------------------------------------------------------------------------------------
# bench sample


def bench_sample(cfg: BenchSampleConfig) -> dict:
    """Run the sampling benchmark, print the table, return the results."""
    from rich.table import Table

    from rcm.parallel import compile_blocks
    from rcm.wan.pipeline import decode_videos, sample_wan_latent

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
    runs = [(f"student {n} step{'s' if n > 1 else ''}", dict(kind="student", steps=n)) for n in cfg.student_steps]
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
        sample_wan_latent(net, context, noise, kind="student", steps=2, generator=torch.Generator().manual_seed(0))
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
