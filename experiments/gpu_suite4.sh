#!/usr/bin/env bash
# Device call (session 2, one H100/H200): train steps of wan_1_3b at 480p x 21 frames with
# kernel-time profiles: TF-sCM, TF-dCM, SF-DMD chunk 3, and TF-sCM frame-wise; first the streaming
# benchmark again with impl=auto sending unmasked calls to cuDNN.
# Usage on the device (repo root): bash experiments/gpu_suite4.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== bench_streaming chunk 3, impl auto (cuDNN for the unmasked cache calls) =="
timeout 120 python3 experiments/bench_streaming.py --models wan_1_3b --blocks 3 --steps 2,4 \
  --contexts noisy,clean --repeats 3 --profile $OUT/trace_stream --out $OUT/bench_streaming_chunk3_cudnn.json 2>&1 \
  | grep -v "^[IWE]11" | tail -34
rm -rf $OUT/trace_stream
echo "== train steps, chunk 3 =="
timeout ${T3:-360} python3 experiments/bench_train_step.py --modes tf_scm,tf_dcm,sf_dmd --block_frames 3 --iters 3 \
  --profile $OUT/trace_train --out $OUT/bench_train_step_chunk3.json 2>&1 | grep -v "^[IWE]11" | tail -75
rm -rf $OUT/trace_train
echo "== train step TF-sCM frame-wise =="
timeout ${T1:-110} python3 experiments/bench_train_step.py --modes tf_scm --block_frames 1 --iters 3 \
  --out $OUT/bench_train_step_frame.json 2>&1 | grep -v "^[IWE]11" | tail -4
