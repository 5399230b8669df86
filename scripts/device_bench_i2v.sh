#!/usr/bin/env bash
# `rcm bench i2v` on one H200 (issue 18's device acceptance): 480p Wan2.2 TI2V-5B-shaped and I2V-A14B-shaped
# (two 14B experts) 4-step sampling with the first frame given, and one rCM iteration (student + critic) of
# the 5B shape; random weights built on the meta device, bf16, eager and compiled.
#   bash scripts/device_bench_i2v.sh          # all three parts, each in its own process (~5 min expected)
#   bash scripts/device_bench_i2v.sh sample   # the two sampling parts only
#   bash scripts/device_bench_i2v.sh step     # the 5B rCM iteration only
# Each part has its own time limit (sum 450 s: well within an 8-minute call) and writes $OUT/i2v_<part>.json
# after it finishes, plus a log; a part that fails or times out leaves the others' results.
# The GPU image has no tyro: its wheels are carried in .whl/cli (pip download tyro==1.0.17 and deps).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/cli/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench_i2v}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
part() {  # part <name> <seconds>
    timeout "$2" python3 cli.py bench i2v --parts "$1" --out "$OUT/i2v_$1.json" "${@:3}" 2>&1 | tee "$OUT/i2v_$1.log"
    echo "== $1: exit ${PIPESTATUS[0]}"
}
case "${1:-all}" in
  all) part sample-ti2v 100; part sample-a14b 160; part step-ti2v 190 ;;
  sample) part sample-ti2v 150; part sample-a14b 300 ;;
  step) part step-ti2v 450 ;;
  *) echo "usage: $0 all|sample|step"; exit 2 ;;
esac
ls -la "$OUT"
