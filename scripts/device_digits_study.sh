#!/usr/bin/env bash
# The digits convergence study (docs/study.md) on one GPU, over several device calls on one warm machine.
# Each call starts `rcm study` in its own process session unless it is running (a restart resumes every
# run from its checkpoints; scored snapshots are not scored again), waits WAIT seconds, and copies the
# study's outputs (not the checkpoints) to $OUT. With FINISH=1 it then searches the students' 4-step
# mid-times on the newest checkpoints (selection seed 1; scripts/digits_midtimes.py).
#   bash scripts/device_digits_study.sh 560              # start, or keep going
#   FINISH=1 bash scripts/device_digits_study.sh 300     # the last call
# The GPU image has no tyro: its wheels are carried in .whl/cli (pip download tyro==1.0.17 docstring-parser typeguard).
set -uo pipefail
WAIT=${1:-560}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/cli/*.whl >/dev/null 2>&1 || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/digits_study}
DIR=${STUDY_DIR:-runs/study}
mkdir -p "$OUT" runs
if pgrep -f "rcm study" >/dev/null; then
    echo "study running"
else
    echo "starting the study ($(date -u +%T))"
    setsid nohup python3 -m rcm study --device cuda --concurrent --threads 1 --checkpoint-every 250 \
        --out-dir "$DIR" ${STUDY_ARGS:-} >>runs/study.log 2>&1 </dev/null &
    echo $! > runs/study.pid  # setsid's child leads its own process group: FINISH stops that group alone
fi
end=$((SECONDS + WAIT))
while [ $SECONDS -lt $end ] && pgrep -f "rcm study" >/dev/null; do
    sleep 30
    grep -h "^study:" runs/study.log | tail -n 2
    for m in rcm dmd2 scm; do
        printf '%s: %s  ' "$m" "$(ls "$DIR/$m/checkpoints" 2>/dev/null | grep step_ | tail -n 1)"
    done
    echo
done
if [ -n "${FINISH:-}" ]; then
    kill -TERM -- -"$(cat runs/study.pid)"; sleep 5  # the study's outputs so far are already written
    python3 scripts/digits_midtimes.py --runs rcm=$DIR/rcm dmd2=$DIR/dmd2 --steps 4 --seed 1 --out "$OUT/midtimes" \
        --candidates 1.3,1.0,0.6 1.2,0.8,0.4 1.0,0.6,0.3 1.1,0.9,0.7 0.8,0.6,0.4 1.4,1.1,0.8 2>&1 | tail -n 12
fi
cp runs/study.log "$OUT/" 2>/dev/null
find "$DIR" -path '*/checkpoints' -prune -o -type f \( -name '*.json' -o -name '*.md' -o -name '*.png' \
    -o -name '*.jsonl' \) -print | tar czf "$OUT/study_outputs.tgz" -T -
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
echo "done $(date -u +%T)"
