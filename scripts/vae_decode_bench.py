"""Device benchmark for the VAE decode (issue 16, goal 6: 81 frames at 480p in <= 1.0 s on an H200).

Run on the GPU machine from the repository root:  PYTHONPATH=$PWD python3 scripts/vae_decode_bench.py
Random Wan2.1 (or --wan22) VAE weights; times the bf16 decode of one [1, 16, 21, 60, 104] latent
(81 frames, 480x832) for each layout and chunk size, against the fp32 decode (relative L2 error and
max abs error), with the peak memory and how many decoder conv inputs left the channels-last layout.
Writes JSON lines to $OUT/vae_decode.jsonl (or /tmp).
"""

import json
import os
import sys
import time

import torch

from rcm.models.vae import WanVAE, WanVAEConfig
from rcm.models.vae.blocks import CausalConv3d

OUT = os.environ.get("OUT", "/tmp")
wan22 = "--wan22" in sys.argv
cfg = WanVAEConfig.wan22() if wan22 else WanVAEConfig()
torch.manual_seed(0)
with torch.device("cuda"):
    vae = WanVAE(cfg)
for name, p in vae.named_parameters():  # the default init is fine for convs; norm gains around 1
    if "norm" in name:
        torch.nn.init.normal_(p, 1.0, 0.1)
vae = vae.eval().requires_grad_(False)
t, h, w = 21, 480 // cfg.spatial_factor, 832 // cfg.spatial_factor
latent = torch.randn(1, cfg.z_dim, t, h, w, device="cuda")


def record(row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "vae_decode.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def timed(model, **kw):
    model.decode(latent, **kw)  # warm-up (cuDNN autotuning)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    x = model.decode(latent, **kw)
    torch.cuda.synchronize()
    return x, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def layout_misses(model, channels_last: bool) -> list[bool]:
    """For each decoder conv call of a short decode: did its input leave the channels-last layout?"""
    misses = []

    def check(module, args):
        misses.append(not args[0].is_contiguous(memory_format=torch.channels_last_3d))

    hooks = [m.register_forward_pre_hook(check) for m in model.decoder.modules() if isinstance(m, CausalConv3d)]
    model.decode(latent[:, :, :2], channels_last=channels_last)
    for hk in hooks:
        hk.remove()
    return misses


torch.backends.cudnn.benchmark = True
print(torch.__version__, torch.cuda.get_device_name(), "wan2.2" if wan22 else "wan2.1", flush=True)
ref, sec, mem = timed(vae, chunk_size=1)
record({"dtype": "fp32", "chunk_size": 1, "seconds": round(sec, 3), "peak_gib": round(mem, 1)})
vae_bf16 = vae.to(torch.bfloat16)
for channels_last in (False, True):
    off_layout = layout_misses(vae_bf16, channels_last)
    for chunk in (1, 2, 4):
        x, sec, mem = timed(vae_bf16, chunk_size=chunk, channels_last=channels_last)
        d = (x.double() - ref.double()).flatten()
        row = {"dtype": "bf16", "channels_last": channels_last, "chunk_size": chunk, "seconds": round(sec, 3),
               "peak_gib": round(mem, 1), "rel_l2_vs_fp32": float(d.norm() / ref.double().norm()),
               "max_abs_vs_fp32": float(d.abs().max()),
               "conv_inputs_not_channels_last": f"{sum(off_layout)}/{len(off_layout)}"}  # fmt: skip
        record(row)
