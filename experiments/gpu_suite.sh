#!/usr/bin/env bash
# One device call: toy teacher training, model forward baseline, train-step benchmark.
# Usage on the device (repo root): bash experiments/gpu_suite.sh  (writes under $OUT)
set -u
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print(jax.__version__, jax.devices())"
mkdir -p $OUT
if [ "${SKIP_TEACHER:-0}" != 1 ]; then
  echo "== toy teacher (teacher forcing) =="
  timeout -s TERM ${TEACHER_S:-140} python3 -m crm_jax.main --config=configs/toy_teacher_tf.py \
      --workdir=/tmp/toy_teacher --config.num_iterations=${TEACHER_ITERS:-5000} 2>&1 | grep -v "it/s]$" | tail -5
  tail -2 /tmp/toy_teacher/metrics.jsonl
  cp /tmp/toy_teacher/metrics.jsonl $OUT/toy_teacher_metrics.jsonl
  tar -C /tmp/toy_teacher -czf $OUT/toy_teacher_export.tgz export
fi
echo "== bench_model =="
timeout ${MODEL_S:-80} python3 experiments/bench_model.py --impl cudnn --out $OUT/bench_model_cudnn.json 2>&1 | tail -4
echo "== bench_train_step =="
timeout ${TRAIN_S:-190} python3 experiments/bench_train_step.py --out $OUT/bench_train_step.json 2>&1 | tail -8
echo "== bench_streaming (chunk 3) =="
timeout ${STREAM_S:-150} python3 experiments/bench_streaming.py --models wan_1_3b --blocks 3 --steps 1,2,4 \
    --contexts clean,noisy --out $OUT/bench_streaming.json 2>&1 | tail -12
