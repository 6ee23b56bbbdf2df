#!/usr/bin/env bash
# Second device call: train-step benchmark (TF-sCM, SF-DMD) and the block-causal model forward
# with the Pallas kernels. Usage on the device (repo root): bash experiments/gpu_suite2.sh
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p $OUT
echo "== bench_train_step =="
timeout ${TRAIN_S:-300} python3 experiments/bench_train_step.py --out $OUT/bench_train_step.json 2>&1 | grep -v "^I11\|^W11" | tail -12
echo "== bench_model (Pallas, block-causal chunk 3 / full) =="
timeout ${MODEL_S:-90} python3 experiments/bench_model.py --impl triton --pattern block_causal --out $OUT/bench_model_triton_bc.json 2>&1 | tail -2
timeout ${MODEL_S:-90} python3 experiments/bench_model.py --impl triton --pattern full --out $OUT/bench_model_triton_full.json 2>&1 | tail -1
