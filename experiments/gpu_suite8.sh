#!/usr/bin/env bash
# Device call (session 2, one H100/H200): frame-wise (block_frames 1) TF-dCM and SF-DMD train steps
# (wan_1_3b, 480p, 21 frames). SF-DMD frame-wise traces 21 cache layouts into one step: long compile.
# Usage on the device (repo root): bash experiments/gpu_suite8.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
echo "== tf_dcm frame-wise =="
timeout 110 python3 experiments/bench_train_step.py --modes tf_dcm --block_frames 1 --iters 2 \
  --out $OUT/bench_train_step_tf_dcm_frame.json 2>&1 | grep -v "^[IWE]11" | tail -1
echo "== sf_dmd frame-wise =="
timeout ${TS:-300} python3 experiments/bench_train_step.py --modes sf_dmd --block_frames 1 --iters 2 \
  --out $OUT/bench_train_step_sf_dmd_frame.json 2>&1 | grep -v "^[IWE]11" | tail -1
