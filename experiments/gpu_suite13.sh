#!/usr/bin/env bash
# Device call of session 11 (issue 7): the streaming sampler's hand-over and dispatch (wan_1_3b, 480p,
# 21 latent frames, chunk 3, B = 1, bf16, DiT only; same seeds, so every variant must generate the same
# video up to bf16 rounding), then a kernel profile of the first variant's 2-step noisy chunk with
# the idle time split into its gaps (experiments/trace_summary.py), and the trace itself.
#
# Usage on the device (repo root):  bash experiments/gpu_suite13.sh        (writes under $OUT)
#   ORDER="static_sep_xm static_sep s9"   streaming variants, in order (names below)
#   PROFILE=1                              profile the first variant's 2-step noisy chunk
#   CONFIGS=2:clean REPEATS=1              fewer configurations / repeats (a short call)
# Variants (flags of experiments/bench_streaming.py; the three target rows):
#   s9             session 9's defaults: device call loop, clean re-run fused into the call loop
#   sep            the clean re-run dispatched on its own after the chunk (device call loop)
#   static_sep     the same with a compile-time call count (asynchronous dispatch: prefetch works)
#   static_sep_xm  static_sep + the cross-attention on our Mosaic-GPU kernel (no cuDNN memsets)
set -u
START=$SECONDS
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null
python3 -c "import jax, flax; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, d.device_kind, d.compute_capability, d.core_count, 'SMs')"
filter() { grep -Ev "^[IWE][0-9]{4} |^WARNING: All log messages|Source Location Trace|file_system.cc|^$" "$1" | tail -"$2"; }
declare -A FLAGS=(
  [s9]="--cache_attn_impl mgpu --call_loop device --clean_rerun fused"
  [sep]="--cache_attn_impl mgpu --call_loop device --clean_rerun separate"
  [static_sep]="--cache_attn_impl mgpu --call_loop static --clean_rerun separate"
  [static_sep_xm]="--cache_attn_impl mgpu --call_loop static --clean_rerun separate --cross_attn_impl mgpu"
)
ORDER=${ORDER:-"static_sep_xm static_sep s9"}
CC=/tmp/jax_cc13
COMMON="--models wan_1_3b --blocks 3 --repeats ${REPEATS:-2} --compile_cache $CC"
CONFIGS=${CONFIGS:-2:noisy,2:clean,4:clean}
for v in $ORDER; do
  echo "== stream $v: ${FLAGS[$v]}"
  timeout ${STREAM_TIMEOUT:-150} python3 experiments/bench_streaming.py $COMMON --configs $CONFIGS \
    --label $v ${FLAGS[$v]} --out "$OUT/stream_$v.json" > "$OUT/log_stream_$v.txt" 2>&1
  echo "   rc=$?, $((SECONDS - START)) s so far"
  filter "$OUT/log_stream_$v.txt" 4
done
python3 experiments/bench_streaming.py --compare "$OUT"/stream_*.json | tee "$OUT/compare.txt"
if [ -n "${PROFILE:-}" ]; then
  v=${ORDER%% *}
  echo "== profile $v, 2 steps noisy"
  timeout ${PROFILE_TIMEOUT:-110} python3 experiments/bench_streaming.py $COMMON --configs 2:noisy --repeats 1 \
    --label "${v}" ${FLAGS[$v]} --profile /tmp/trace13 --out "$OUT/profile_$v.json" > "$OUT/log_profile.txt" 2>&1
  echo "   rc=$?"
  filter "$OUT/log_profile.txt" 60
  t=$(find /tmp/trace13 -name 'perfetto_trace.json.gz' | head -1)
  [ -n "$t" ] && [ "$(stat -c %s "$t")" -lt 15000000 ] && cp "$t" "$OUT/trace.json.gz"
fi
# at most 8 files come back: the logs and results in one archive, the comparison and trace beside it
(cd "$OUT" && tar czf /tmp/suite13.tgz --exclude compare.txt --exclude trace.json.gz . && \
  find . -maxdepth 1 -type f ! -name compare.txt ! -name trace.json.gz -delete && mv /tmp/suite13.tgz .)
echo "== done in $((SECONDS - START)) s"
