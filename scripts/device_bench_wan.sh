#!/usr/bin/env bash
# `rcm bench step` and `rcm bench sample` for Wan2.1-1.3B at 480p / 81 frames on one GPU (issue 9).
#   bash scripts/device_bench_wan.sh step     # the rCM iteration, eager and compiled, with a profile
#   bash scripts/device_bench_wan.sh sample   # 1/2/4-step student vs 50-step CFG teacher, + VAE decode
#   bash scripts/device_bench_wan.sh both     # both, within one 10-minute device call
# The GPU image has no tyro: its wheels are carried in .whl/cli (pip download tyro==1.0.17 and deps).
# Results (JSON, logs, a Chrome trace) go to $OUT.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/cli/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench_wan}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step() {
    timeout "${LIMIT:-560}" python3 cli.py bench step --model wan2.1-t2v-1.3b --resolution 480p --num-frames 81 \
      --json-path "$OUT/step.json" --profile "$OUT/step_trace.json" "$@" 2>&1 | tee "$OUT/step.log"
}
sample() {
    timeout "${LIMIT:-560}" python3 cli.py bench sample --model wan2.1-t2v-1.3b --resolution 480p --num-frames 81 \
      --json-path "$OUT/sample.json" "$@" 2>&1 | tee "$OUT/sample.log"
}
case "${1:-step}" in
  step) step "${@:2}" ;;
  sample) sample "${@:2}" ;;
  both) LIMIT=${STEP_LIMIT:-330} step || true; LIMIT=${SAMPLE_LIMIT:-240} sample ;;
  *) echo "usage: $0 step|sample|both [extra flags]"; exit 2 ;;
esac
