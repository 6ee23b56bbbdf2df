#!/usr/bin/env bash
# Device call (issue 7, streaming speed; one H200): wan_1_3b, 480p, 21 latent frames, chunk 3, B = 1,
# bf16, DiT only -- the three target rows (2 steps noisy, 2 steps clean, 4 steps clean) for the
# current path and the KV-cache / call-loop variants, a side-by-side table (with a video fingerprint
# check: same seeds, so every variant must generate the same video), then a kernel profile of the
# best variant's 2-step noisy chunk (experiments/trace_summary.py).
#
# Usage on the device (repo root):  bash experiments/gpu_suite9.sh                 (writes under $OUT)
# CPU dry run of every command path: PATH=/work/main/.venv/bin:$PATH QUICK=1 OUT=/tmp/suite9 \
#                                    bash experiments/gpu_suite9.sh               (tiny model, --quick)
#
# Wall time: at most BUDGET seconds (default 335) after the setup, under the 6 minutes:
# every step gets `timeout` = min(its own cap, what is left minus the profile's reserve), and a step
# that would get less than 30 s is skipped, so one failure or hang costs only its own slot.
# Variants (priority order; flags of experiments/bench_streaming.py):
#   base         the session-2 path (concat of [cached | new] keys per layer, layer scan, fori_loop)
#   layers       --kv_update inplace --kv_layout per_layer: per-layer cache and weights, each layer
#                writes its keys into its buffer and cuDNN attends over the buffer with a valid length
#                (no KV concat, no weight-slice copies, one compile for all 7 cache layouts)
#   layers_lt    layers + XLA's cuBLASLt GEMMs (xla_gpu_enable_cublaslt), whose epilogues can take
#                the FFN's bias + tanh-GELU (a 4680 x 8960 elementwise pass per layer and call now)
#   inplace      --kv_update inplace on the stacked cache (layer scan carries the cache; one prefix copy)
# Not in the default ORDER (set ORDER="..." to run them): layers_host (layers + --call_loop host: one
# async jitted call per model call), layers_static (layers + --call_loop static: the chunk's call loop
# with a compile-time trip count) and layers_graphs (layers + CUDA-graph command buffers around
# while loops too), static_graphs / host_graphs (layers_static / layers_host + the same command buffers).
set -u
START=$SECONDS
if [ -n "${QUICK:-}" ]; then          # CPU dry run: no wheels to install, no GPU
  export PYTHONPATH=. PYTHONUNBUFFERED=1
  OUT=${OUT:-/tmp/suite9}
  mkdir -p "$OUT"
  COMMON="--quick --blocks 3 --configs 2:noisy,2:clean,4:clean --repeats 1"
  KEY=tiny:3:2:noisy
else
  source experiments/device_env.sh
  CC=${CC:-/tmp/jax_cc_suite9}      # persistent compile cache: the profile run reuses the variant's compiles
  COMMON="--models wan_1_3b --blocks 3 --configs 2:noisy,2:clean,4:clean --repeats 2 --compile_cache $CC"
  KEY=wan_1_3b:3:2:noisy
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(no nvidia-smi)"
BUDGET=${BUDGET:-335}
CAP=${CAP:-110}                       # per-variant cap, seconds
RESERVE=${RESERVE:-50}                # kept for the profile until the variants are done
GRAPHS=xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
declare -A FLAGS=(
  [base]="--kv_update concat --kv_layout stacked"
  [layers]="--kv_update inplace --kv_layout per_layer"
  [inplace]="--kv_update inplace"
  [layers_host]="--kv_update inplace --kv_layout per_layer --call_loop host"
  [layers_static]="--kv_update inplace --kv_layout per_layer --call_loop static"
  [layers_lt]="--kv_update inplace --kv_layout per_layer --compiler_option xla_gpu_enable_cublaslt=true"
  [layers_graphs]="--kv_update inplace --kv_layout per_layer --compiler_option $GRAPHS"
  [static_graphs]="--kv_update inplace --kv_layout per_layer --call_loop static --compiler_option $GRAPHS"
  [host_graphs]="--kv_update inplace --kv_layout per_layer --call_loop host --compiler_option $GRAPHS"
)
ORDER=${ORDER:-"base layers layers_lt inplace"}
left() { echo $(( BUDGET - (SECONDS - START) )); }
filter() { grep -Ev "^[IWE][0-9]{4} |^WARNING: All log messages" "$1" | tail -"$2"; }

run_variant() {   # name
  local name=$1 t rc
  t=$(( $(left) - RESERVE )); [ "$t" -gt "$CAP" ] && t=$CAP
  if [ "$t" -lt 30 ]; then echo "== $name: skipped (${t}s left of the budget)"; return; fi
  echo "== $name (timeout ${t}s): ${FLAGS[$name]:-(defaults)}"
  timeout "$t" python3 experiments/bench_streaming.py $COMMON --label "$name" ${FLAGS[$name]} \
    --out "$OUT/stream_$name.json" > "$OUT/log_$name.txt" 2>&1
  rc=$?
  filter "$OUT/log_$name.txt" 6
  echo "   rc=$rc$([ $rc = 124 ] && echo ' (timed out; finished rows are in the JSON)'), $((SECONDS - START)) s so far"
}

for v in $ORDER; do run_variant "$v"; done

echo "== comparison (steady f/s / host dispatch ms; best by $KEY)"
python3 experiments/bench_streaming.py --compare "$OUT"/stream_*.json --compare_key "$KEY" | tee "$OUT/compare.txt"
best=$(tail -1 "$OUT/compare.txt" | sed -n 's/^best: //p')
if [ -z "$best" ] || [ "$best" = none ] || [ -z "${FLAGS[$best]+x}" ]; then
  echo "== profile: skipped (no best variant)"
else
  t=$(left); [ "$t" -gt 90 ] && t=90
  if [ "$t" -lt 30 ]; then
    echo "== profile of $best: skipped (${t}s left)"
  else
    echo "== profile of $best, 2 steps noisy (timeout ${t}s)"
    timeout "$t" python3 experiments/bench_streaming.py $COMMON --configs 2:noisy --repeats 1 --label "$best" \
      ${FLAGS[$best]} --profile "$OUT/trace9" --out "$OUT/profile_$best.json" > "$OUT/log_profile.txt" 2>&1
    echo "   rc=$?"
    filter "$OUT/log_profile.txt" 30
  fi
fi
rm -rf "$OUT/trace9"
echo "== done in $((SECONDS - START)) s"
