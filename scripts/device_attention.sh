#!/usr/bin/env bash
# Attention kernels on the GPU machine, from the repo root:
#   scripts/device_attention.sh sweep|sweep-d64   fused-JVP variant timings + matmul ceiling -> $OUT/sweep.{log,jsonl}
#   scripts/device_attention.sh tests   GPU-marked kernel tests                     -> $OUT/tests.log
#   scripts/device_attention.sh bench   rcm bench attention                          -> $OUT/bench.{log,json}
# Several modes may follow each other: scripts/device_attention.sh sweep bench
# An optional jvp-flash-attention wheel travels in .whl/ (carry it) for BENCH_ARGS="--include ... jvp_flash_attention".
set -o pipefail
OUT=${OUT:-/tmp/rcm-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for mode in "$@"; do
  case "$mode" in
    sweep|sweep-d64)
      timeout ${SWEEP_TIMEOUT:-330} python3 scripts/attention_sweep.py ${mode#sweep-} 2>&1 | tee -a "$OUT/sweep.log" ;;
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider \
        tests/test_triton_attention.py tests/test_attention.py 2>&1 | tee -a "$OUT/tests.log" | tail -40 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-300} python3 -m rcm.bench.attention --out-json "$OUT/bench.json" $BENCH_ARGS 2>&1 \
        | tee -a "$OUT/bench.log" ;;
    *) echo "unknown mode $mode"; exit 2 ;;
  esac
done
