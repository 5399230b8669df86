#!/usr/bin/env bash
# Wan2.1 T2V sampling at the real 1.3B size on a GPU (acceptance 3 of issue 4), through the same code
# as `rcm sample` (rcm.wan.sample.sample_wan):
#   random weights, 1.3B DiT in bf16, 480p 16:9, 81 frames, 4-step student sampling, VAE decode, MP4.
# The DiT checkpoint is written to disk and loaded back (strict, official layout), as are the full-size
# VAE and a one-layer random umT5 of the DiT's text width (text encoding is excluded from the figures).
# Prints DiT seconds per step, VAE decode seconds and peak GPU memory after text encoding. Two samples:
# the first warms up (kernel autotuning), the second's steps are the steady-state figure.
#
#   bash scripts/device_wan_sample.sh                     # on the GPU machine, from the repo root
# imageio-ffmpeg (for the MP4) is installed from .whl/sample/*.whl when present (the GPU image lacks it):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl/sample imageio-ffmpeg==0.6.0            # then carry .whl/sample
#
# Measured on one H100 80GB (torch 2.11, 2025-11), wall 53 s including writing the random checkpoints:
#   32 760 tokens (latent 16x21x60x104); DiT 0.73 s/step warm (first step of the first sample 2.8 s:
#   kernel warm-up), so 4 steps ~2.9 s; VAE decode of 81 frames 480x832: 2.2-2.7 s (chunk_size 1);
#   peak GPU memory after text encoding 4.95 GiB (target < 20 GB); 81-frame MP4 read back, 832x480.
set -euo pipefail
if ls .whl/sample/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/sample/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
WORK=${WORK:-/tmp/wan_sample}
SAVE=${OUT:-$WORK/out}
mkdir -p "$WORK" "$SAVE"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 - "$WORK" "$SAVE" <<'EOF'
import json, sys, time
from pathlib import Path

import torch
from rich.console import Console

from rcm.models.checkpoint import save_dit
from rcm.models.text_encoder import tiny_text_encoder
from rcm.models.vae import WanVAE, save_vae
from rcm.models.wan import WanDiT, wan_config
from rcm.sample import result_json
from rcm.wan.sample import WanSampleConfig as SampleConfig, sample_wan as sample

work, save = Path(sys.argv[1]), Path(sys.argv[2])
console = Console(width=120)
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
t0 = time.perf_counter()
cfg = wan_config("wan2.1-t2v-1.3b")
torch.manual_seed(0)
with torch.device("cuda"):
    dit = WanDiT(cfg)  # official init, on the GPU (fast)
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # the head is zero-initialized: give it a signal
save_dit(dit.to(torch.bfloat16), work / "dit.safetensors", metadata={"kind": "student"})
del dit
torch.cuda.empty_cache()
save_vae(WanVAE(), work / "vae.safetensors")
te = tiny_text_encoder(cfg.text_dim, num_layers=1, num_heads=32)
te.model.save_pretrained(work / "umt5")
te.tokenizer.save_pretrained(work / "umt5")
del te
print(f"random checkpoints written in {time.perf_counter() - t0:.1f} s "
      f"(DiT {(work / 'dit.safetensors').stat().st_size / 2**30:.2f} GiB)")

result = sample(SampleConfig(
    model="wan2.1-t2v-1.3b", dit_path=work / "dit.safetensors", vae_path=work / "vae.safetensors",
    text_encoder_path=work / "umt5", prompt="A red fox running through fresh snow, cinematic",
    num_samples=2, steps=4, sigma_max=80.0, resolution="480p", aspect_ratio="16:9", num_frames=81,
    seed=0, device="cuda", save_path=save / "student.mp4"), console=console)
steps = result.extra["step_seconds"]
summary = {
    "dit_seconds_per_step_warm": sum(steps[4:]) / len(steps[4:]),
    "dit_seconds_per_step_first_sample": steps[:4],
    "vae_decode_seconds": result.extra["decode_seconds"],
    "peak_gpu_memory_gib_after_text_encoding": result.peak_memory_gb,
    "tokens": result.extra["tokens"], "latent_shape": result.extra["latent_shape"],
}
print("SUMMARY " + json.dumps(summary))
print("RESULT " + result_json(result))
import imageio.v2 as iio2
r = iio2.get_reader(result.paths[0]); n = r.count_frames(); size = r.get_meta_data()["size"]; r.close()
print(f"read back {result.paths[0].name}: {n} frames, {size[0]}x{size[1]}")
EOF
