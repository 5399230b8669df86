#!/usr/bin/env bash
# Wan2.1 distillation end to end on one GPU (acceptance 2 of issue 6), through the CLI a user runs:
#   random weights: the 1.3B DiT (bf16 file), the full-size VAE, a random one-layer umT5 of width 4096;
#   rcm synth (2 prompts, 33 frames at 240x416, 4 Euler teacher steps with CFG)
#   -> rcm distill wan2.1-t2v-1.3b, 3 iterations (bf16 + fp32 master weights, one GPU): a student sCM step,
#      a student sCM+DMD step, a critic step (tangent warmup 1, student update freq 2)
#   -> export (EMA student, one safetensors file) -> rcm sample wan, 4 steps -> MP4.
# Prints seconds per distillation iteration (and its phase) and peak GPU memory; logs and the MP4 go to $OUT.
#
#   bash scripts/device_wan_distill.sh            # on the GPU machine, from the repo root (python3 cli.py ...)
#   bash scripts/device_wan_distill.sh --tiny     # the same pipeline with tiny random models, on the CPU
#   LAUNCH="torchrun --standalone --nproc-per-node 2" bash scripts/device_wan_distill.sh
#       synth and distill sharded over 2 GPUs (FSDP2, DCP checkpoints); the student is then exported from the
#       DCP checkpoint by `rcm export` in one process and sampled on one GPU (issue 10, acceptance 3)
# Wheels the GPU image lacks are installed from .whl/cli (tyro and its needs) and .whl/sample
# (imageio-ffmpeg, for the MP4s) when present: carry .whl.
set -euo pipefail
for dir in .whl/cli .whl/sample; do
  if ls $dir/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $dir/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
done
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
TINY=0; [[ "${1:-}" == "--tiny" ]] && TINY=1
WORK=${WORK:-/tmp/wan_distill}
SAVE=${OUT:-$WORK/out}
rm -rf "$WORK/data" "$WORK/run"
mkdir -p "$WORK" "$SAVE"
if [[ $TINY == 1 ]]; then
  MODEL=wan; DEVICE=cpu; SIZE=(--num-frames 5 --height 16 --width 32); EXTRA=(--threads 2)
else
  MODEL=wan2.1-t2v-1.3b; DEVICE=cuda; SIZE=(--num-frames 33 --height 240 --width 416); EXTRA=()
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

python3 - "$WORK" "$TINY" <<'EOF'
import sys, time
from pathlib import Path

import torch

from rcm.models.checkpoint import save_dit
from rcm.models.text_encoder import tiny_text_encoder
from rcm.models.vae import WanVAE, WanVAEConfig, save_vae
from rcm.models.wan import WanConfig, WanDiT, wan_config

work, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
t0 = time.perf_counter()
cfg = (WanConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_len=32, text_dim=64, freq_dim=32) if tiny
       else wan_config("wan2.1-t2v-1.3b"))
device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
print(f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ", CPU"))
torch.manual_seed(0)
with torch.device(device):
    dit = WanDiT(cfg)  # official init
    torch.nn.init.normal_(dit.head.head.weight, std=0.02)  # the head is zero-initialized: give it a signal
save_dit(dit.to(torch.bfloat16), work / "teacher.safetensors", metadata={"kind": "teacher"})
del dit
save_vae(WanVAE(WanVAEConfig.tiny() if tiny else WanVAEConfig()), work / "vae", layout="diffusers")
te = tiny_text_encoder(cfg.text_dim, num_layers=1, num_heads=4 if tiny else 32, text_len=cfg.text_len)
te.model.save_pretrained(work / "umt5")
te.tokenizer.save_pretrained(work / "umt5")
(work / "prompts.txt").write_text("A red fox running through fresh snow, cinematic\nWaves at sunset\n")
print(f"random checkpoints written in {time.perf_counter() - t0:.1f} s")
EOF

LAUNCH=${LAUNCH:-python3}
echo "== synth"
$LAUNCH cli.py synth --prompts "$WORK/prompts.txt" --teacher "$WORK/teacher.safetensors" \
  --text-encoder-path "$WORK/umt5" --out-dir "$WORK/data" "${SIZE[@]}" --steps 4 --shard-size 1 \
  --device $DEVICE "${EXTRA[@]}" 2>&1 | tee "$SAVE/synth.log"

echo "== distill"
$LAUNCH cli.py distill $MODEL --teacher "$WORK/teacher.safetensors" --data "$WORK/data" --out-dir "$WORK/run" \
  --loop.iterations 3 --loop.log-every 1 --loop.checkpoint-every 3 --loss.scm.tangent-warmup 1 \
  --loss.student-update-freq 2 --sample-every 0 --num-sample-prompts 1 --sample-steps 1 4 \
  --vae-path "$WORK/vae" --device $DEVICE "${EXTRA[@]}" 2>&1 | tee "$SAVE/distill.log"
cp "$WORK/run/log.jsonl" "$SAVE/distill_log.jsonl"
cp "$WORK/run/samples/iter_00000003_4step_0.mp4" "$SAVE/training_sample_4step.mp4"

echo "== export the EMA student from the latest checkpoint (DCP under torchrun), in one process"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 cli.py export --checkpoint "$WORK/run/checkpoints" \
  --out "$WORK/run/exported.safetensors" 2>&1 | tee "$SAVE/export.log"

echo "== sample the exported student"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} python3 cli.py sample wan --dit-path "$WORK/run/exported.safetensors" --vae-path "$WORK/vae" \
  --text-encoder-path "$WORK/umt5" --prompt "A red fox running through fresh snow, cinematic" --steps 4 \
  "${SIZE[@]}" --device $DEVICE --save-path "$SAVE/student.mp4" 2>&1 | tee "$SAVE/sample.log"

python3 - "$SAVE" <<'EOF'
import json, sys
from pathlib import Path

import imageio.v3 as iio

save = Path(sys.argv[1])
logs = [json.loads(line) for line in (save / "distill_log.jsonl").read_text().splitlines()]
rows = [{"iteration": e["iteration"], "phase": e["phase"], "seconds": e["seconds_per_iteration"],
         "peak_memory_gib": e.get("peak_memory_gib"),
         "losses": {k: round(v, 4) for k, v in e.items() if k.startswith("loss_")}} for e in logs]
for r in rows:
    print(f"iteration {r['iteration']} ({r['phase']}): {r['seconds']:.2f} s, peak {r['peak_memory_gib']} GiB, {r['losses']}")
frames = iio.imread(save / "student.mp4", index=None, plugin="FFMPEG")
print(f"read back student.mp4: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}")
print("SUMMARY " + json.dumps({"iterations": rows, "student_mp4": list(frames.shape)}))
EOF
