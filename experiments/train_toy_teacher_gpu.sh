#!/usr/bin/env bash
# Train the shipped toy teacher on one GPU and pack its export (device call; writes under $OUT).
#   bash experiments/train_toy_teacher_gpu.sh   (carry .whl: ml_collections is not on the device image)
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT
start=$(date +%s)
timeout -s TERM ${TEACHER_S:-330} python3 -m crm_jax.main --config=configs/toy_teacher_tf.py \
    --workdir=/tmp/toy_teacher 2>&1 | grep -v "it/s]$\|^I11\|^W11" | tail -3
echo "teacher wall s: $(( $(date +%s) - start ))"
tail -2 /tmp/toy_teacher/metrics.jsonl
cp /tmp/toy_teacher/metrics.jsonl $OUT/toy_teacher_metrics.jsonl
tar -C /tmp/toy_teacher -czf $OUT/toy_teacher_export.tgz export
