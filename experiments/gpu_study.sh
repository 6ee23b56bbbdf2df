#!/usr/bin/env bash
# Device call (one H100/H200): jobs of the toy study (issue 9), several processes sharing the GPU.
#   STUDY_ONLY=prep bash experiments/gpu_study.sh        # classifier + teachers (call 1)
#   bash experiments/gpu_study.sh                        # the rest, with runs/toy_study carried (call 2)
# STUDY_ARGS: more toy_study.py flags (e.g. "--student_weights raw", "--set dmd_iters=800").
# STUDY_WARM=JOB: run JOB alone until its first evaluation (its compiles fill the persistent cache that
# the identical programs of STUDY_ONLY's jobs then load), then STUDY_ONLY (which must not name JOB)
# beside it; STUDY_THEN: jobs run after both (e.g. a final job that needs them all). STUDY_S bounds all.
# Writes $OUT/study.tgz (the workdir without checkpoints, TensorBoard files, the synthetic set, exports
# and $PACK_EXCLUDE), $OUT/export_JOB.tgz for each job named in EXPORTS (e.g. EXPORTS="teacher_c2";
# both refreshed every minute so a cut call still returns them), $OUT/dmon.txt (GPU utilisation every 5 s).
set -u
if [ -n "${STUDY_WARM:-}" ] && [ -z "${STUDY_ONLY:-}" ]; then
  echo "STUDY_WARM needs STUDY_ONLY (the jobs to run after it, without it)"; exit 2
fi
source experiments/device_env.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
W=${STUDY_DIR:-runs/toy_study}
mkdir -p $W
# study.tgz: everything but checkpoints, synthetic set, TensorBoard files and exports; each job's export
# in its own export_JOB.tgz (files come back at most 16 MiB each, 8 in all), for the jobs in EXPORTS.
pack() {
  tar --exclude='checkpoints' --exclude='set' --exclude='tb' --exclude='export' ${PACK_EXCLUDE:+--exclude=$PACK_EXCLUDE} \
    -czf $OUT/study.tgz.tmp -C $(dirname $W) $(basename $W) && mv $OUT/study.tgz.tmp $OUT/study.tgz
  for j in ${EXPORTS:-}; do
    [ -d $W/$j/export ] && tar -czf $OUT/export_$j.tgz.tmp -C $(dirname $W) $(basename $W)/$j/export \
      && mv $OUT/export_$j.tgz.tmp $OUT/export_$j.tgz
  done
}
( while sleep 60; do pack; done ) & PACKER=$!
nvidia-smi dmon -s u -d 5 > $OUT/dmon.txt 2>&1 & DMON=$!
STUDY_END=$(( SECONDS + ${STUDY_S:-540} ))
study() {
  local t=$(( STUDY_END - SECONDS ))
  if [ $t -lt 5 ]; then echo "study $*: no time left"; return; fi
  timeout $t python3 experiments/toy_study.py --workdir $W --parallel ${PARALLEL:-10} ${STUDY_ARGS:-} "$@"
  echo "study $* exit $?"
}
if [ -n "${STUDY_WARM:-}" ]; then   # one job alone until its first evaluation: its compiles fill the cache
  study --only $STUDY_WARM & WARM=$!
  until [ -s $W/$STUDY_WARM/eval.jsonl ] || ! kill -0 $WARM 2>/dev/null; do sleep 5; done
  echo "warm-up job $STUDY_WARM evaluated at $SECONDS s; starting the rest"
fi
study ${STUDY_ONLY:+--only $STUDY_ONLY}
[ -n "${STUDY_WARM:-}" ] && wait $WARM
[ -n "${STUDY_THEN:-}" ] && study --only $STUDY_THEN
sleep 2; kill $PACKER $DMON 2>/dev/null; pack
for f in $W/*/done.json; do python3 -c "import json,sys; d=json.load(open('$f')); print(d['job'], d.get('seconds'), d.get('iterations',''))"; done
ls -la $OUT
