#!/usr/bin/env bash
# Device call (session 2, one H100/H200): host offload of the EMA and teacher after moving the EMA's
# host->device copy to the update, TF-sCM and SF-DMD (wan_1_3b, 480p, 21 frames, chunk 3).
# Usage on the device (repo root): bash experiments/gpu_suite7.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
for m in tf_scm sf_dmd; do
  echo "== $m offload ema,teacher =="
  timeout 200 python3 experiments/bench_train_step.py --modes $m --iters 2 --offload ema,teacher \
    --out $OUT/bench_train_step_${m}_offload.json 2>&1 | grep -v "^[IWE]11" | tail -1
done
