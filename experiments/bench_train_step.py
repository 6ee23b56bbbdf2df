"""Train-step time, peak memory and model-FLOPs utilisation on one or more GPUs (random weights).

  python experiments/bench_train_step.py [--modes tf_scm,tf_dcm,sf_dmd] [--model wan_1_3b] [--frames 21]
         [--block_frames 3] [--remat block] [--impl auto] [--mesh 1,1,1] [--per_device_batch 1]
         [--profile DIR] [--out FILE]

`--mesh data,fsdp,context` runs the step sharded (crm_jax.training.sharding: data
parallel, FSDP parameters/moments, Ulysses context parallelism) over that many local
devices; the global batch is per_device_batch x data x fsdp (a context group shares
its samples). MFU = model FLOPs x batch / step time / (measured bf16 peak x devices).
`--profile DIR` traces one more step per mode and prints where the kernel time goes
(experiments/trace_summary.py). `--offload ema,teacher` keeps the EMA / frozen teacher in pinned
host memory and splits the step around them (crm_jax/training/offload.py); every row also
gives each jit's compiled device memory (`memory_analysis`, GiB per device: arguments + outputs -
aliases + temps) and the device memory in use between steps. The peak is the process's
(`peak_bytes_in_use` since start, initialisation included), so run one mode per process when
comparing peaks.

Student, teacher and critic share the architecture (1.3B teacher by default; `--teacher
wan_14b` gives the teacher and the critic the 14B architecture, bf16 teacher weights). Student
params, EMA and AdamW moments are float32; compute is bf16 (`dtype`), attention through
`pallas_kernels.ops.attention` (Pallas kernels on GPU). FLOPs count every pass of the
step from `forward_flops` (bench_model.py): TF-sCM = teacher fwd x2 (CFG) + jvp pass
(~3 fwd) + student fwd + bwd (2 fwd) on the packed 2T sequence; TF-dCM = teacher fwd x2
(CFG ODE step) + target fwd + student fwd + bwd; SF-DMD = rollout
forwards + replayed last steps (fwd + bwd) + teacher x2 + critic fwd on T frames.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from crm_jax.models.config import get_model_config  # noqa: E402
from crm_jax.models.wan import AttentionPattern, functional, init_model  # noqa: E402
from crm_jax.training import sharding as shd  # noqa: E402
from crm_jax.training.offload import make_step, place_frozen  # noqa: E402
from crm_jax.training.steps import Frozen, TrainConfig, Trainer  # noqa: E402
from experiments import trace_summary  # noqa: E402
from experiments.bench_model import forward_flops  # noqa: E402
from pallas_kernels import masks  # noqa: E402


def step_flops(mode, cfg, frames, tpf, block_frames, sf_steps, text, teacher_cfg=None):
    """Model FLOPs of one student step (per sample); the teacher/critic passes use `teacher_cfg`."""
    tcfg = cfg if teacher_cfg is None else teacher_cfg
    tf = AttentionPattern("teacher_forcing", block_frames).mask_spec(2 * frames, tpf)
    bc = AttentionPattern("block_causal", block_frames).mask_spec(frames, tpf)
    full = masks.full(frames * tpf)
    f_tf, t_tf = (forward_flops(c, 2 * frames * tpf, text, masks.allowed_pairs(tf)) for c in (cfg, tcfg))
    f_bc = forward_flops(cfg, frames * tpf, text, masks.allowed_pairs(bc))
    t_full = forward_flops(tcfg, frames * tpf, text, masks.allowed_pairs(full))
    if mode == "tf_scm":
        return 2 * t_tf + 3 * f_tf + 3 * f_tf  # teacher CFG, jvp pass, student fwd+bwd
    if mode == "tf_dcm":
        return 2 * t_tf + f_tf + 3 * f_tf  # teacher CFG, target fwd, student fwd+bwd
    # SF-DMD student step: rollout (sf_steps fwd + clean re-run) + replay fwd+bwd + teacher CFG + critic
    return (sf_steps + 1) * f_bc + 3 * f_bc + 2 * t_full + t_full


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="tf_scm,sf_dmd")
    ap.add_argument("--model", default="wan_1_3b")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--block_frames", type=int, default=3)
    ap.add_argument("--sf_steps", type=int, default=2)
    ap.add_argument("--remat", default="block")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak; 0 = measure a matmul")
    ap.add_argument("--teacher", default=None, help="teacher/critic architecture (default: the student's)")
    ap.add_argument("--offload", default="", help="comma list of ema,teacher kept in pinned host memory")
    ap.add_argument("--mesh", default="1,1,1", help="data,fsdp,context sizes")
    ap.add_argument("--per_device_batch", type=int, default=1)
    ap.add_argument("--profile", default=None, help="trace one extra step per mode into DIR/<mode>")
    ap.add_argument("--out", default="experiments/results/bench_train_step.json")
    args = ap.parse_args()
    data, fsdp, context = (int(v) for v in args.mesh.split(","))
    mesh = shd.make_mesh(data, fsdp, context)
    ndev = data * fsdp * context
    batch_size = args.per_device_batch * data * fsdp

    dev = jax.devices()[0]
    peak = args.peak_tflops
    if not peak:
        a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
        mm = jax.jit(lambda a: a @ a)
        jax.block_until_ready(mm(a))
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(mm(a))
            ts.append(time.perf_counter() - t0)
        peak = 2 * 8192**3 / statistics.median(ts) / 1e12
    print(
        f"device {dev.device_kind} x{ndev} (mesh data={data} fsdp={fsdp} context={context}, "
        f"batch {batch_size}): measured bf16 matmul {peak:.0f} TFLOP/s per device",
        flush=True,
    )

    cfg = get_model_config(args.model, dtype="bfloat16", param_dtype="float32", remat=args.remat, attn_impl=args.impl)
    apply, params = functional(init_model(cfg, 0))
    teacher_cfg, teacher_apply = cfg, None
    if args.teacher and args.teacher != args.model:
        teacher_cfg = get_model_config(
            args.teacher, dtype="bfloat16", param_dtype="bfloat16", remat=args.remat, attn_impl=args.impl
        )
        teacher_apply, teacher = functional(init_model(teacher_cfg, 1))
        critic_init = (
            jax.tree.map(lambda p: p.astype(jnp.float32), teacher)
            if "sf_dmd" in args.modes or "rcm" in args.modes
            else None
        )
    else:
        teacher = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        critic_init = params
    tpf = (args.height // 2) * (args.width // 2)
    ks = jax.random.split(jax.random.key(1), 3)
    batch = dict(
        latents=jax.random.normal(ks[0], (batch_size, args.frames, args.height, args.width, cfg.in_channels)),
        context=jax.random.normal(ks[1], (batch_size, cfg.text_len, cfg.text_dim), jnp.bfloat16),
    )
    neg = jnp.zeros((cfg.text_len, cfg.text_dim), jnp.bfloat16)
    offload = [o for o in args.offload.split(",") if o]
    if set(offload) - {"ema", "teacher"}:
        raise ValueError(f"--offload takes ema and/or teacher, got {args.offload!r}")
    frozen = Frozen(teacher, teacher, neg)  # the DMD teacher is the teacher: placed once, shared
    fr_sh = shd.state_shardings(frozen, mesh, offload=("teacher", "dmd_teacher") if "teacher" in offload else ())
    frozen = place_frozen(frozen, fr_sh)
    del teacher  # an offloaded teacher keeps no device copy
    b_sh = shd.batch_shardings(batch, mesh, batch_size)
    batch = jax.device_put(batch, b_sh)
    key_sh = shd.replicated(jax.random.key(0), mesh)
    rows = []
    for mode in args.modes.split(","):
        tcfg = TrainConfig(mode=mode, block_frames=args.block_frames, dmd_teacher_pattern="full")
        trainer = Trainer(tcfg, apply, cfg, teacher_apply=teacher_apply)
        fresh = jax.tree.map(jnp.copy, params)  # the step donates its state: never hand it `params`
        state = trainer.init_state(fresh, critic=critic_init if tcfg.has_critic else None)
        st_sh = shd.state_shardings(state, mesh, offload=("ema",) if "ema" in offload else ())
        state = jax.device_put(state, st_sh)
        step = make_step(trainer, mesh, (st_sh, fr_sh, b_sh, key_sh), "student", sf_steps=args.sf_steps, use_dmd=True)
        t0 = time.time()
        state, m = step(state, frozen, batch, jax.random.key(2))
        jax.block_until_ready(m)
        compile_s = time.time() - t0
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            state, m = step(state, frozen, batch, jax.random.key(3 + i))
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        flops = batch_size * step_flops(
            mode, cfg, args.frames, tpf, args.block_frames, args.sf_steps, cfg.text_len, teacher_cfg
        )
        peak_mem = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat)
        in_use = max((d.memory_stats() or {}).get("bytes_in_use", 0) for d in mesh.devices.flat)
        compiled = {
            name: {k: round(v / 2**30, 2) for k, v in st.items()}  # cached: no recompile
            for name, st in step.memory(state, frozen, batch, jax.random.key(0)).items()
        }
        rows.append(
            dict(
                mode=mode,
                teacher=args.teacher or args.model,
                offload=args.offload,
                device=dev.device_kind,
                devices=ndev,
                mesh=args.mesh,
                batch=batch_size,
                block_frames=args.block_frames,
                remat=args.remat,
                step_s=round(med, 3),
                compile_s=round(compile_s, 1),
                loss=float(m["loss"]),
                model_tflop=round(flops / 1e12, 1),
                mfu=round(flops / med / 1e12 / (peak * ndev), 3),
                peak_gib_per_device=round(peak_mem / 2**30, 1),
                in_use_gib_between_steps=round(in_use / 2**30, 1),
                compiled_gib=compiled,
            )
        )
        print(rows[-1], flush=True)
        if args.profile:
            tdir = os.path.join(args.profile, f"{mode}_b{args.block_frames}_m{args.mesh.replace(',', 'x')}")
            with jax.profiler.trace(tdir, create_perfetto_trace=True):
                state, m = step(state, frozen, batch, jax.random.key(99))
                jax.block_until_ready(m)
            try:
                summary = trace_summary.summarize(tdir)
                rows[-1]["profile"] = summary
                print(trace_summary.fmt(summary), flush=True)
            except (ValueError, FileNotFoundError) as e:
                print(f"profile summary failed: {e}", flush=True)
        del state
    print(
        "| mode | teacher | remat | offload | device | mesh d,f,c | batch | chunk | step s | model TFLOP | MFU "
        "| peak GiB/device | compiled GiB per jit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['teacher']} | {r['remat']} | {r['offload'] or '-'} | {r['device']} x{r['devices']} "
            f"| {r['mesh']} | {r['batch']} | {r['block_frames']} | "
            f"{r['step_s']} | {r['model_tflop']} | {r['mfu']:.1%} | {r['peak_gib_per_device']} | "
            + ", ".join(f"{k} {v['total']}" for k, v in r["compiled_gib"].items())
            + " |"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(peak_tflops=peak, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
