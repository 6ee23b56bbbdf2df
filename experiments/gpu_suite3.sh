#!/usr/bin/env bash
# Device call (session 2, one H100/H200): streaming benchmark chunk-wise and frame-wise with a
# kernel-time profile of the 2-step noisy chunk, and the VAE streaming decode.
# Usage on the device (repo root): bash experiments/gpu_suite3.sh   (writes under $OUT)
set -u
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 source experiments/device_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== bench_streaming chunk 3 (profile: 2 steps noisy) =="
timeout ${S3:-200} python3 experiments/bench_streaming.py --models wan_1_3b --blocks 3 --steps 2,1,4 \
  --contexts noisy,clean --repeats 3 --profile $OUT/trace_stream --out $OUT/bench_streaming_chunk3.json 2>&1 \
  | grep -v "^[IWE]11" | tail -40
rm -rf $OUT/trace_stream
echo "== bench_vae (real config, bf16, 480p) =="
timeout ${SV:-150} python3 experiments/bench_vae.py --out $OUT/bench_vae.json 2>&1 | grep -v "^[IWE]11" | tail -12
echo "== bench_streaming frame-wise =="
timeout ${S1:-220} python3 experiments/bench_streaming.py --models wan_1_3b --blocks 1 --steps 2,1,4 \
  --contexts noisy,clean --repeats 2 --out $OUT/bench_streaming_frame.json 2>&1 | grep -v "^[IWE]11" | tail -12
