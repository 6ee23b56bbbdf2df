"""Toy-teacher training throughput: where a step of the toy study's teacher recipe spends its time.

    python experiments/bench_toy_teacher.py --out results/bench_toy_teacher.json            # GPU
    python experiments/bench_toy_teacher.py --quick --variants base --out /tmp/btt.json     # CPU smoke

For each variant (the toy study's causal teacher recipe, `toy_study.teacher_config`, with model /
batch overrides) it times, after warm-up, medians of `--repeats` windows of `--iters` iterations:

  data_ms     one training batch from the on-the-fly toy world (`ToySource.batch` + device_put),
              as the training loop makes it
  step_ms     one jitted train step on a batch already on the device, `block_until_ready`
  loop_ms     the loop body (batch + step, metrics fetched every `log_every` steps), per iteration
  clips_s     batch size / loop_ms

The teacher-forcing step packs [clean | noisy] (2 x 8 frames of 4 x 4 tokens at patch 2, 8 x 8 at
patch 1). Variants (name: overrides) are in VARIANTS; `--variants a,b` picks some; gpu_run13 measured
all but `study` (docs/benchmarks.md, "Toy study").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

# Every variant names its model in full (the study's defaults change between sessions).
SMALL = (("dim", 128), ("ffn_dim", 256), ("num_heads", 2), ("num_layers", 3))  # session 3's toy model
BIG = (("dim", 256), ("ffn_dim", 1024), ("num_heads", 4), ("num_layers", 6))
F32, BF16 = (("dtype", "float32"),), (("dtype", "bfloat16"),)
AUTO, XLA = (("attn_impl", "auto"),), (("attn_impl", "xla"),)
P1 = (("patch_size", (1, 1, 1)),)
VARIANTS = {  # name: model overrides (+ batch_size; default 128)
    "base": dict(model=SMALL + F32 + AUTO),
    "xla_attn": dict(model=SMALL + F32 + XLA),
    "bf16": dict(model=SMALL + BF16 + AUTO),
    "b512_bf16_xla": dict(batch_size=512, model=SMALL + BF16 + XLA),
    "patch1_bf16": dict(model=SMALL + P1 + BF16 + AUTO),
    "big_bf16": dict(model=BIG + BF16 + AUTO),
    "big_patch1_bf16": dict(model=BIG + P1 + BF16 + AUTO),
    "study": dict(batch_size=256, model=()),  # toy_study's teacher recipe as it is (STUDY_MODEL)
}


def build(overrides: dict, quick: bool):
    """(config, state, frozen, step, source, batch shardings) of one variant."""
    import jax
    import toy_study as ts

    from crm_jax.data.sources import make_source
    from crm_jax.models.wan import functional, init_model
    from crm_jax.training import loop, run_setup
    from crm_jax.training import sharding as shd
    from crm_jax.training.offload import make_step
    from crm_jax.training.steps import Frozen, Trainer

    study = ts.Study("/tmp/bench_toy_teacher", "smoke" if quick else "full")
    c = ts.teacher_config(study, "teacher_tf", 2)
    c.model.overrides.update(dict(overrides.get("model", ())))
    c.data.batch_size = 8 if quick else overrides.get("batch_size", 128)
    mcfg, tcfg = run_setup.model_config(c), run_setup.train_config(c)
    src = make_source(c, mcfg)
    apply, params = functional(init_model(mcfg, c.seed))
    trainer = Trainer(tcfg, apply, mcfg)
    frozen = Frozen(None, None, src.negative_context()) if tcfg.cond_dropout > 0 else None
    state = trainer.init_state(params, None)
    mesh = shd.make_mesh(1, 1, 1)
    st_sh = shd.state_shardings(state, mesh)
    fr_sh = shd.state_shardings(frozen, mesh) if frozen is not None else None
    state = jax.device_put(state, st_sh)
    example = loop.model_batch(src.batch(0))
    b_sh = shd.batch_shardings(example, mesh, c.data.batch_size)
    step = make_step(trainer, mesh, (st_sh, fr_sh, b_sh, shd.replicated(jax.random.key(0), mesh)), "student")
    return c, state, frozen, step, src, b_sh


def time_variant(name: str, overrides: dict, iters: int, repeats: int, quick: bool) -> dict:
    import jax

    from crm_jax.training import loop, run_setup

    c, state, frozen, step, src, b_sh = build(overrides, quick)
    key = jax.random.key(0)
    get_batch = lambda it: jax.device_put(loop.model_batch(src.batch(it)), b_sh)
    t0 = time.perf_counter()
    batch = get_batch(0)
    state, m = step(state, frozen, batch, key)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    data, steps, loops = [], [], []
    it = 1
    for _ in range(repeats + 1):  # the first window is a warm-up
        t0 = time.perf_counter()
        for _ in range(iters):
            jax.block_until_ready(get_batch(it))
            it += 1
        data.append((time.perf_counter() - t0) / iters)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(iters):
            state, m = step(state, frozen, batch, jax.random.fold_in(key, it))
            it += 1
        jax.block_until_ready(state)
        steps.append((time.perf_counter() - t0) / iters)
        t0 = time.perf_counter()
        pending = []
        for i in range(iters):
            state, m = step(state, frozen, get_batch(it), jax.random.fold_in(key, it))
            pending.append(m)
            it += 1
            if (i + 1) % c.log_every == 0:
                jax.device_get(pending)
                pending.clear()
        jax.block_until_ready(state)
        loops.append((time.perf_counter() - t0) / iters)
    med = lambda xs: statistics.median(xs[1:]) * 1e3
    b = int(c.data.batch_size)
    mcfg = run_setup.model_config(c)
    return dict(
        variant=name,
        batch=b,
        dim=mcfg.dim,
        layers=mcfg.num_layers,
        patch=list(mcfg.patch_size),
        dtype=mcfg.runtime.dtype,
        attn_impl=mcfg.runtime.attn_impl,
        compile_s=round(compile_s, 1),
        data_ms=round(med(data), 3),
        step_ms=round(med(steps), 3),
        loop_ms=round(med(loops), 3),
        clips_s=round(b / (med(loops) / 1e3)),
        loss=float(m["loss"]),
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="CPU smoke: batch 8, few iterations")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    import jax

    print(f"device: {jax.devices()[0].device_kind}")
    rows = []
    print(
        f"{'variant':18s} {'batch':>5s} {'compile s':>9s} {'data ms':>8s} {'step ms':>8s} {'loop ms':>8s} {'clips/s':>8s}"
    )
    for n in names:
        r = time_variant(n, VARIANTS[n], a.iters, a.repeats, a.quick)
        rows.append(r)
        print(
            f"{n:18s} {r['batch']:5d} {r['compile_s']:9.1f} {r['data_ms']:8.2f} {r['step_ms']:8.2f} "
            f"{r['loop_ms']:8.2f} {r['clips_s']:8d}",
            flush=True,
        )
        if a.out:  # after every variant, so a cut run keeps what it measured
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(
                    dict(device=jax.devices()[0].device_kind, iters=a.iters, repeats=a.repeats, rows=rows), f, indent=1
                )


if __name__ == "__main__":
    main()
