#!/usr/bin/env bash
# Device call (session 2, one H100/H200): memory policies of the TF-sCM step (wan_1_3b, 480p, 21
# frames, chunk 3): remat of matmul outputs only ("dots"), host offload of the EMA and teacher, and
# a 14B teacher distilled into the 1.3B student.
# Usage on the device (repo root): bash experiments/gpu_suite6.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
run() { name=$1; shift; echo "== $name =="; timeout ${TL:-170} python3 experiments/bench_train_step.py --modes tf_scm \
  --iters 2 "$@" --out $OUT/bench_train_step_$name.json 2>&1 | grep -v "^[IWE]11" | tail -1; }
run offload_ema_teacher --offload ema,teacher
run teacher_14b --teacher wan_14b
run remat_dots --remat dots
