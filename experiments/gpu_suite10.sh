#!/usr/bin/env bash
# Device call (issue 10, one H200): host offload of the EMA and the frozen teacher with split steps
# (crm_jax/training/offload.py: teacher pass | main step | EMA update). wan_1_3b, 480p, 21 latent
# frames, chunk 3, remat block: TF-sCM with --offload ema,teacher, SF-DMD with it, TF-sCM without it
# (the baseline; gpu_run5 measured 8.22 s, 57.7 GiB), and, if the wall-time budget still allows,
# TF-sCM with a 14B teacher and offload (without: 16.29 s, 83.0 GiB, gpu_run7). One process per run
# (the peak is the process's). Runs are guarded by `timeout` so that the script ends within BUDGET
# seconds of wall time (default 295); a run is skipped when less than its expected duration is left.
# Usage on the device (repo root): bash experiments/gpu_suite10.sh   (writes under $OUT)
#   RUNS="teacher_14b" bash experiments/gpu_suite10.sh   runs only the named runs (here ~150 s)
set -u
source experiments/device_env.sh
BUDGET=${BUDGET:-295}
RUNS=${RUNS:-"tf_scm_offload sf_dmd_offload tf_scm_plain teacher_14b"}
run() {  # name, time limit s, expected duration s, bench_train_step arguments...
  name=$1; limit=$2; need=$3; shift 3
  case " $RUNS " in *" $name "*) ;; *) return ;; esac
  left=$((BUDGET - SECONDS))
  if [ $left -lt $need ]; then echo "== $name: skipped, ${left}s of the budget left (needs ~${need}s) =="; return; fi
  [ $limit -gt $left ] && limit=$left
  echo "== $name (timeout ${limit}s, ${SECONDS}s elapsed) =="
  timeout $limit python3 experiments/bench_train_step.py "$@" --out $OUT/bench_train_step_$name.json 2>&1 \
    | grep -v "^[IWE]1[0-9]" | tail -1
  echo "   exit ${PIPESTATUS[0]} after ${SECONDS}s"
}
run tf_scm_offload 110 75 --modes tf_scm --iters 2 --offload ema,teacher
run sf_dmd_offload 160 110 --modes sf_dmd --iters 2 --offload ema,teacher
run tf_scm_plain 100 65 --modes tf_scm --iters 1
run teacher_14b 240 150 --modes tf_scm --iters 1 --offload ema,teacher --teacher wan_14b
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
print("| run | mode | teacher | offload | step s | compile+1st s | peak GiB | in use GiB | compiled GiB per jit (total / temp) |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "bench_train_step_*.json"))):
    for r in json.load(open(f))["rows"]:
        jits = ", ".join(f"{k} {v['total']} / {v['temp']}" for k, v in r.get("compiled_gib", {}).items())
        print(f"| {os.path.basename(f)[17:-5]} | {r['mode']} | {r['teacher']} | {r['offload'] or '-'} | {r['step_s']} "
              f"| {r['compile_s']} | {r['peak_gib_per_device']} | {r.get('in_use_gib_between_steps')} | {jits} |")
EOF
echo "suite wall ${SECONDS}s"
