#!/usr/bin/env bash
# Device call (session 2, two H200 of one host): scale-out of the TF-sCM step (wan_1_3b, 480p,
# 21 frames, chunk 3): one GPU, data parallel at fixed per-GPU batch, FSDP, context parallel
# (Ulysses); then SF-DMD data parallel if time is left. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
# Usage on the device (repo root): bash experiments/gpu_suite5.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -4
for m in 1,1,1 2,1,1 1,2,1 1,1,2; do
  echo "== TF-sCM mesh $m =="
  timeout ${TS:-150} python3 experiments/bench_train_step.py --modes tf_scm --mesh $m --iters 2 --peak_tflops ${PEAK:-0} \
    --out $OUT/bench_train_step_tf_scm_mesh${m//,/x}.json 2>&1 | grep -v "^[IWE]11" | tail -3
done
for m in 2,1,1; do
  [ $SECONDS -lt 420 ] || { echo "skipping SF-DMD mesh $m (time)"; break; }
  echo "== SF-DMD mesh $m =="
  timeout 150 python3 experiments/bench_train_step.py --modes sf_dmd --mesh $m --iters 3 --peak_tflops ${PEAK:-0} \
    --out $OUT/bench_train_step_sf_dmd_mesh${m//,/x}.json 2>&1 | grep -v "^[IWE]11" | tail -3
done
