#!/usr/bin/env bash
# Device call (one H200): (1) toy-teacher training throughput (issue 9: what limits the toy study's
# teachers; experiments/bench_toy_teacher.py, every variant), (2) the streaming call-loop variants
# (issue 7: experiments/gpu_suite9.sh with ORDER="layers_static layers_host layers").
# Usage on the device (repo root): bash experiments/gpu_suite11.sh   (writes under $OUT)
set -u
source experiments/device_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== toy teacher throughput"
timeout ${TOY_S:-230} python3 experiments/bench_toy_teacher.py --iters ${TOY_ITERS:-30} --repeats 2 \
  --variants ${TOY_VARIANTS:-base,xla_attn,bf16,b512_bf16_xla,patch1_bf16,big_bf16,big_patch1_bf16} --out $OUT/bench_toy_teacher.json 2>&1 | grep -Ev "^[IWE][0-9]{4} "
echo "== streaming call loops ($SECONDS s so far)"
ORDER=${ORDER:-"layers_static layers_host layers"} BUDGET=${BUDGET:-300} bash experiments/gpu_suite9.sh
