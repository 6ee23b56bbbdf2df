#!/usr/bin/env bash
# Train a toy causal teacher (CONFIG, default configs/toy_teacher_tf.py) on one GPU and pack its export under $OUT.
#   bash experiments/train_toy_teacher_gpu.sh [extra --config.* flags]
# TEACHER_S caps the wall time (SIGTERM: checkpoint + export of the iterations reached).
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name --format=csv,noheader
name=${NAME:-toy_teacher}
mkdir -p $OUT
start=$(date +%s)
timeout -s TERM ${TEACHER_S:-540} python3 -m crm_jax.main --config=${CONFIG:-configs/toy_teacher_tf.py} \
    --workdir=/tmp/$name "$@" > /tmp/$name.log 2>&1
echo "$name: rc $? wall s: $(( $(date +%s) - start ))"
grep -v "it/s]$\|^I1\|^W1" /tmp/$name.log | tail -4
tail -1 /tmp/$name/metrics.jsonl
cp /tmp/$name/metrics.jsonl $OUT/${name}_metrics.jsonl
tar -C /tmp/$name -czf $OUT/${name}_export.tgz export
