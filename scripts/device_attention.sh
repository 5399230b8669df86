#!/usr/bin/env bash
# Attention kernels on the GPU machine, from the repo root:
#   scripts/device_attention.sh sweep [jvp|fwd|all]   variant timings  -> $OUT/sweep.{log,jsonl}
#   scripts/device_attention.sh tests                 GPU tests         -> $OUT/tests.log
#   scripts/device_attention.sh bench                 rcm bench attention -> $OUT/bench.{log,json}
# Several modes may follow each other: scripts/device_attention.sh sweep all tests
# The jvp-flash-attention wheel travels in .whl/ (carry it): see docs/kernels.md.
set -o pipefail
OUT=${OUT:-/tmp/rcm-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
while [ $# -gt 0 ]; do
  case "$1" in
    sweep)
      stage=all; case "$2" in jvp|jvp2|d256|cudnnbwd|fwd|all) stage=$2; shift;; esac
      timeout ${SWEEP_TIMEOUT:-450} python3 scripts/attention_sweep.py $stage 2>&1 | tee -a "$OUT/sweep.log" ;;
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider \
        tests/test_triton_attention.py 2>&1 | tee -a "$OUT/tests.log" | tail -40 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-400} python3 -m rcm.bench.attention --out-json "$OUT/bench.json" $BENCH_ARGS 2>&1 \
        | tee -a "$OUT/bench.log" ;;
    *) echo "unknown mode $1"; exit 2 ;;
  esac
  shift
done
