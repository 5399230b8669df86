#!/usr/bin/env bash
# Issue 10 on a multi-GPU machine (nvidia-h200-x2 / -x4 / -x8). NVLink multicast stays off (the device rules).
#   bash scripts/device_multi_gpu.sh step   # Wan2.1-1.3B 480p/81 frames: 1 GPU, then FSDP2 over all GPUs, then
#                                           # CP=2: first-iteration losses against the 1-GPU run, step times,
#                                           # peak memory per GPU, scaling efficiency (--compare)
#   bash scripts/device_multi_gpu.sh 14b    # Wan2.1-14B, one student + critic iteration, FSDP2 over all GPUs
#                                           # (CP from $CP, default 1); needs >= 4 H200s for the memory
#   bash scripts/device_multi_gpu.sh dcp    # synth -> distill sharded over all GPUs -> `rcm export` of the DCP
#                                           # checkpoint in one process -> sample on one GPU
# Each stage fits one 10-minute call (the first builds the 1.3B weights on rank 0 and compiles nothing).
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/cli/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/multi_gpu}
mkdir -p "$OUT"
N=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
RUN="torchrun --standalone --nproc-per-node $N"
BENCH=(bench step --resolution 480p --num-frames 81 --modes eager --repeats 1)
case "${1:-step}" in
  step)
    CUDA_VISIBLE_DEVICES=0 python3 cli.py "${BENCH[@]}" --json-path "$OUT/one_gpu.json" 2>&1 | tee "$OUT/one_gpu.log"
    $RUN cli.py "${BENCH[@]}" --compare "$OUT/one_gpu.json" --json-path "$OUT/fsdp_$N.json" 2>&1 | tee "$OUT/fsdp_$N.log"
    $RUN cli.py "${BENCH[@]}" --parallel.cp 2 --compare "$OUT/one_gpu.json" --json-path "$OUT/cp2_$N.json" \
      2>&1 | tee "$OUT/cp2_$N.log" ;;
  14b)
    $RUN cli.py "${BENCH[@]}" --model wan2.1-t2v-14b --parallel.cp "${CP:-1}" --json-path "$OUT/14b_$N.json" \
      2>&1 | tee "$OUT/14b_$N.log" ;;
  dcp)
    LAUNCH="$RUN" bash scripts/device_wan_distill.sh ;;
  *) echo "usage: $0 step|14b|dcp"; exit 2 ;;
esac
