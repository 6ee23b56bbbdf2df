#!/usr/bin/env bash
# One device call: run the named benchmarks on the GPU(s) of this machine and leave their JSON and
# logs under $OUT. Run from the repository root:
#
#   bash experiments/device_run.sh JOB [JOB ...]
#
# Jobs (the commands behind each table of docs/benchmarks.md):
#   attention        experiments/bench_attention.py: block-sparse Pallas-Triton kernels vs cuDNN
#   attention_check  experiments/attention_gpu_check.py: kernel numerics on the GPU vs a float32 reference
#   cache_attention  experiments/bench_cache_attention.py: attention over the KV cache (Mosaic-GPU vs cuDNN)
#   model            experiments/bench_model.py: wan_1_3b forward, cuDNN full and Pallas block-causal
#   streaming        experiments/bench_streaming.py: wan_1_3b streaming, chunk 3, the three target rows
#   streaming_frame  the same frame-wise (chunk 1), 2 steps noisy context
#   train_step       experiments/bench_train_step.py: TF-sCM, TF-dCM, SF-DMD steps, chunk 3
#   offload          TF-sCM and SF-DMD steps with the EMA and teacher in host memory
#   teacher_14b      TF-sCM step with a 14B teacher (and offload) for the 1.3B student
#   mesh             TF-sCM on every 2-GPU mesh (data, fsdp, context) and SF-DMD data parallel
#   vae              experiments/bench_vae.py: the Wan VAE's streaming decode at 480p
#   toy_teacher      experiments/bench_toy_teacher.py: throughput of the toy teacher's step
#   study            experiments/toy_study.py jobs (see "Toy study" below)
#   all              attention_check attention cache_attention model streaming train_step vae
#
# Environment:
#   OUT                 output directory (required); everything ends up in $OUT/results.tgz
#   JOB_S               time limit of one job in seconds (default 300); a job over it is stopped
#   PROFILE=DIR         also write a jax.profiler trace of the streaming / train-step jobs under $OUT/DIR
#   STREAM_ARGS         extra flags of bench_streaming.py (e.g. "--cache_attn_impl cudnn")
#   TRAIN_ARGS          extra flags of bench_train_step.py (e.g. "--block_frames 1")
#   CPU_DRY_RUN=1       tiny sizes on the CPU (no wheels, no GPU): checks the command lines
#
# Toy study (`study`): STUDY_DIR (workdir, default runs/toy_study), STUDY_ONLY (jobs for --only),
# STUDY_WARM=JOB (run JOB alone until its first evaluation, so that the other jobs load its
# compiled programs from the persistent cache; needs STUDY_ONLY), STUDY_THEN (jobs run after both),
# STUDY_ARGS (more toy_study.py flags, e.g. "--set dmd_iters=800 --seed 1"), PARALLEL (processes,
# default 10), STUDY_S (time limit for all of it, default 540), EXPORTS (jobs whose export is packed
# into $OUT/export_JOB.tgz). The workdir without checkpoints, synthetic set, TensorBoard files and
# exports is packed into $OUT/study.tgz every minute, so that a call cut short still returns it.
#
# The device image has no ml_collections and friends: experiments/device_env.sh installs the wheels
# carried in .whl/ (`pip download --no-deps -d .whl ...` on a machine with the index).
set -u
if [ $# -eq 0 ]; then sed -n '2,40p' "$0"; exit 2; fi
: "${OUT:?set OUT to the output directory}"
START=$SECONDS

if [ -n "${CPU_DRY_RUN:-}" ]; then
  export PYTHONPATH=. PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu
  mkdir -p "$OUT"
  PY=${PY:-python3}
else
  source experiments/device_env.sh
  PY=python3
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$PY -c "import jax; print('jax', jax.__version__, [d.device_kind for d in jax.devices()])"

JOB_S=${JOB_S:-300}
CC=${CC:-/tmp/jax_compile_cache}
filter() { grep -Ev "^[IWE][0-9]{4} |^WARNING: All log messages|Source Location Trace|file_system.cc|^$" | tail -"$1"; }

bench() {  # name, script, args...: one benchmark under `timeout`, log in $OUT/log_NAME.txt
  local name=$1 script=$2 rc
  shift 2
  echo "== $name ($((SECONDS - START)) s so far)"
  timeout "$JOB_S" $PY "experiments/$script" "$@" > "$OUT/log_$name.txt" 2>&1
  rc=$?
  filter 12 < "$OUT/log_$name.txt"
  echo "   $name: rc=$rc$([ $rc = 124 ] && echo ' (timed out)')"
}

profile_flag() {  # --profile DIR for jobs that take one, when PROFILE is set
  [ -n "${PROFILE:-}" ] && echo "--profile $OUT/$PROFILE/$1"
}

if [ -n "${CPU_DRY_RUN:-}" ]; then
  STREAM_SIZE="--quick"
  TRAIN_SIZE="--model tiny --frames 6 --height 8 --width 8 --iters 1 --peak_tflops 1"
  MODEL_SIZE="--model tiny --frames 3 --height 8 --width 8 --iters 1"
  MODEL_IMPL=${MODEL_IMPL:-xla}
  VAE_SIZE="--tiny --repeats 1"
  ATTN_SIZE="--quick"
  CHECK_SIZE="--interpret --max-cases 1"
  TOY_SIZE="--quick"
else
  STREAM_SIZE="--models wan_1_3b --repeats 2 --compile_cache $CC"
  TRAIN_SIZE=""
  MODEL_SIZE=""
  VAE_SIZE=""
  ATTN_SIZE=""
  CHECK_SIZE=""
  TOY_SIZE="--iters 30 --repeats 2"
fi

study() {
  local W=${STUDY_DIR:-runs/toy_study} end=$((SECONDS + ${STUDY_S:-540})) packer warm=""
  if [ -n "${STUDY_WARM:-}" ] && [ -z "${STUDY_ONLY:-}" ]; then
    echo "STUDY_WARM needs STUDY_ONLY (the jobs to run after it, without it)"
    return 2
  fi
  mkdir -p "$W"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=$CC
  pack() {
    tar --exclude=checkpoints --exclude=set --exclude=tb --exclude=export \
      -czf "$OUT/study.tgz.tmp" -C "$(dirname "$W")" "$(basename "$W")" && mv "$OUT/study.tgz.tmp" "$OUT/study.tgz"
    for j in ${EXPORTS:-}; do
      [ -d "$W/$j/export" ] && tar -czf "$OUT/export_$j.tgz.tmp" -C "$(dirname "$W")" "$(basename "$W")/$j/export" \
        && mv "$OUT/export_$j.tgz.tmp" "$OUT/export_$j.tgz"
    done
  }
  run_study() {
    local t=$((end - SECONDS))
    if [ $t -lt 5 ]; then echo "study $*: no time left"; return; fi
    timeout $t $PY experiments/toy_study.py --workdir "$W" --parallel "${PARALLEL:-10}" ${STUDY_ARGS:-} "$@"
    echo "study $*: rc=$?"
  }
  (while sleep 60; do pack; done) &
  packer=$!
  if [ -n "${STUDY_WARM:-}" ]; then
    run_study --only "$STUDY_WARM" &
    warm=$!
    until [ -s "$W/$STUDY_WARM/eval.jsonl" ] || ! kill -0 $warm 2>/dev/null; do sleep 5; done
    echo "warm-up job $STUDY_WARM evaluated after $((SECONDS - START)) s; starting the rest"
  fi
  run_study ${STUDY_ONLY:+--only $STUDY_ONLY}
  [ -n "$warm" ] && wait $warm
  [ -n "${STUDY_THEN:-}" ] && run_study --only "$STUDY_THEN"
  kill $packer 2>/dev/null
  pack
  for f in "$W"/*/done.json; do
    [ -f "$f" ] && $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(d['job'], d.get('seconds'), d.get('iterations', ''))" "$f"
  done
}

run_job() {
  case $1 in
    attention) bench attention bench_attention.py $ATTN_SIZE --out "$OUT/bench_attention.json" ;;
    attention_check) bench attention_check attention_gpu_check.py $CHECK_SIZE --out "$OUT/attention_gpu_check.json" ;;
    cache_attention) bench cache_attention bench_cache_attention.py --n 10 --out "$OUT/bench_cache_attention.json" ;;
    model)
      bench model_cudnn bench_model.py $MODEL_SIZE --impl "${MODEL_IMPL:-cudnn}" --out "$OUT/bench_model_cudnn.json"
      [ -z "${CPU_DRY_RUN:-}" ] && bench model_triton_bc bench_model.py --impl triton --pattern block_causal \
        --out "$OUT/bench_model_triton_bc.json"
      ;;
    streaming)
      bench streaming bench_streaming.py $STREAM_SIZE --blocks 3 --configs 2:noisy,2:clean,4:clean \
        $(profile_flag streaming) ${STREAM_ARGS:-} --out "$OUT/bench_streaming.json"
      ;;
    streaming_frame)
      bench streaming_frame bench_streaming.py $STREAM_SIZE --blocks 1 --configs 2:noisy \
        ${STREAM_ARGS:-} --out "$OUT/bench_streaming_frame.json"
      ;;
    train_step)
      bench train_step bench_train_step.py $TRAIN_SIZE --modes tf_scm,tf_dcm,sf_dmd --block_frames 3 --iters 3 \
        $(profile_flag train_step) ${TRAIN_ARGS:-} --out "$OUT/bench_train_step.json"
      ;;
    offload)
      for m in tf_scm sf_dmd; do
        bench "offload_$m" bench_train_step.py $TRAIN_SIZE --modes $m --iters 2 --offload ema,teacher \
          ${TRAIN_ARGS:-} --out "$OUT/bench_train_step_${m}_offload.json"
      done
      ;;
    teacher_14b)
      bench teacher_14b bench_train_step.py --modes tf_scm --iters 1 --offload ema,teacher --teacher wan_14b \
        ${TRAIN_ARGS:-} --out "$OUT/bench_train_step_teacher_14b.json"
      ;;
    mesh)
      for m in 1,1,1 2,1,1 1,2,1 1,1,2; do
        bench "mesh_tf_scm_${m//,/x}" bench_train_step.py $TRAIN_SIZE --modes tf_scm --mesh $m --iters 2 \
          --out "$OUT/bench_train_step_tf_scm_mesh${m//,/x}.json"
      done
      bench mesh_sf_dmd_2x1x1 bench_train_step.py $TRAIN_SIZE --modes sf_dmd --mesh 2,1,1 --iters 3 \
        --out "$OUT/bench_train_step_sf_dmd_mesh2x1x1.json"
      ;;
    vae) bench vae bench_vae.py $VAE_SIZE --out "$OUT/bench_vae.json" ;;
    toy_teacher) bench toy_teacher bench_toy_teacher.py $TOY_SIZE --out "$OUT/bench_toy_teacher.json" ;;
    study) study ;;
    all) for j in attention_check attention cache_attention model streaming train_step vae; do run_job $j; done ;;
    *)
      echo "unknown job $1 (see the header of $0)"
      return 2
      ;;
  esac
}

for job in "$@"; do run_job "$job"; done
# The device hands back at most 8 files: everything in one archive (the filtered logs are on stdout).
(cd "$OUT" && tar czf /tmp/device_run.tgz --exclude=results.tgz . && find . -mindepth 1 -maxdepth 1 ! -name results.tgz \
  -exec rm -rf {} + && mv /tmp/device_run.tgz results.tgz)
echo "== done in $((SECONDS - START)) s"
ls -la "$OUT"
