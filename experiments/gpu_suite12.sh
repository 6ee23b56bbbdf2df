#!/usr/bin/env bash
# Device calls of session 9 (issue 7): our Mosaic-GPU attention over the KV cache (pallas_kernels/mgpu)
# against cuDNN, kernel by kernel (experiments/bench_cache_attention.py), then the streaming sampler
# (wan_1_3b, 480p, 21 latent frames, chunk 3, B = 1, bf16, DiT only; same seeds, so every variant
# must generate the same video up to bf16 rounding) and a kernel profile of the first variant's
# 2-step noisy chunk.
#
# Usage on the device (repo root):  bash experiments/gpu_suite12.sh        (writes under $OUT)
#   KERNELS="cudnn,ours_s2"  kernel variants (default: all; "none" skips the kernel table)
#   ORDER="new old"          streaming variants, in order (names below)
#   PROFILE=1                profile the first variant's 2-step noisy chunk
# Streaming variants (flags of experiments/bench_streaming.py; configs: the three target rows unless
# the name ends in _2n = 2 steps noisy only):
#   new          the session-9 defaults: mgpu cache attention, text keys/values once per video
#   new_lt       new + XLA's cuBLASLt GEMMs (bias + GELU epilogues)
#   notext_2n    mgpu, but every call projects the text in every layer
#   old          session 8's path: cuDNN cache attention, text projected in every call
#   old_2n       the same, 2 steps noisy only
#   frame_new_2n, frame_old_2n   new / old frame-wise (chunk 1), 2 steps noisy
set -u
START=$SECONDS
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, d.device_kind, d.compute_capability, d.core_count, 'SMs')"
filter() { grep -Ev "^[IWE][0-9]{4} |^WARNING: All log messages|Source Location Trace|file_system.cc|^$" "$1" | tail -"$2"; }
declare -A FLAGS=(
  [new]="--cache_attn_impl mgpu"
  [new_lt]="--cache_attn_impl mgpu --compiler_option xla_gpu_enable_cublaslt=true"
  [notext_2n]="--cache_attn_impl mgpu --no_text_kv"
  [old]="--cache_attn_impl cudnn --no_text_kv"
  [old_2n]="--cache_attn_impl cudnn --no_text_kv"
  [frame_new_2n]="--cache_attn_impl mgpu --blocks 1"
  [frame_old_2n]="--cache_attn_impl cudnn --no_text_kv --blocks 1"
)
KERNELS=${KERNELS:-all}
ORDER=${ORDER:-"new old"}
CC=/tmp/jax_cc12
COMMON="--models wan_1_3b --blocks 3 --repeats 2 --compile_cache $CC"
if [ "$KERNELS" != none ]; then
  echo "== kernels"
  timeout ${KERNEL_TIMEOUT:-220} python3 experiments/bench_cache_attention.py --n 10 \
    $([ "$KERNELS" != all ] && echo "--only $KERNELS") --out "$OUT/bench_cache_attention.json" > "$OUT/log_kernels.txt" 2>&1
  echo "   rc=$?, $((SECONDS - START)) s so far"
  filter "$OUT/log_kernels.txt" 14
fi
for v in $ORDER; do
  configs=2:noisy,2:clean,4:clean; [[ $v == *_2n ]] && configs=2:noisy
  echo "== stream $v: ${FLAGS[$v]} ($configs)"
  timeout ${STREAM_TIMEOUT:-130} python3 experiments/bench_streaming.py $COMMON --configs $configs --label $v \
    ${FLAGS[$v]} --out "$OUT/stream_$v.json" > "$OUT/log_stream_$v.txt" 2>&1
  echo "   rc=$?, $((SECONDS - START)) s so far"
  filter "$OUT/log_stream_$v.txt" 4
done
python3 experiments/bench_streaming.py --compare "$OUT"/stream_*.json | tee "$OUT/compare.txt"
if [ -n "${PROFILE:-}" ]; then
  v=${ORDER%% *}
  echo "== profile $v, 2 steps noisy"
  timeout ${PROFILE_TIMEOUT:-100} python3 experiments/bench_streaming.py $COMMON --configs 2:noisy --repeats 1 \
    --label "${v}" ${FLAGS[$v]} --profile /tmp/trace12 --out "$OUT/profile_$v.json" > "$OUT/log_profile.txt" 2>&1
  echo "   rc=$?"
  filter "$OUT/log_profile.txt" 50
fi
# at most 8 files come back: everything in one archive, the comparison beside it
(cd "$OUT" && tar czf /tmp/suite12.tgz --exclude compare.txt . && \
  find . -maxdepth 1 -type f ! -name compare.txt -delete && mv /tmp/suite12.tgz .)
echo "== done in $((SECONDS - START)) s"
