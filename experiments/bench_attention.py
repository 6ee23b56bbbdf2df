"""GPU benchmark of the block-sparse Pallas-Triton flash attention (docs/design.md §3).

B=1, 12 heads, head_dim 128, bf16. Cases: dense L=32,760; block_causal frame-wise
(21 blocks of 1 frame of 1560 tokens) and chunk-wise (first block 3 frames, then
blocks of 3 frames: 7 blocks) at 32,760; teacher_forcing packed [clean | noisy]
at 65,520 for both patterns. For each: forward, forward+backward and JVP medians
(jit, warm-up, then the median of N runs each ended with block_until_ready), and
useful TFLOP/s. cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`)
dense forward and forward+backward in the same run.

FLOP convention ("useful": only allowed query-key pairs, `masks.allowed_pairs`):
  forward            4  * pairs * D   (QK^T and PV)
  forward+backward   14 * pairs * D   (forward 4 + backward 10, i.e. 2.5x forward:
                                       the usual FlashAttention convention; our
                                       kernels actually recompute S and dP, 7 matmuls)
  JVP                12 * pairs * D   (QK^T, Q'K^T, QK'^T, PV, PV', (P*S')V)

    PYTHONPATH=. python3 experiments/bench_attention.py --out $OUT/bench_attention.json
    ... --quick                      small sizes (smoke test)
    ... --sweep                      also time a few tile configs per kernel
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp

from pallas_kernels import masks, ops
from pallas_kernels.triton import FlashConfig, Tiles

B, H, D = 1, 12, 128
TPF = 1560

# docs/design.md §3 anchors (one H200, 2026-11-21).
ANCHORS = dict(
    cudnn_fwd_ms=12.1,
    cudnn_fwdbwd_ms=41.5,
    rcm_jvp_dense_ms=43.3,
    rcm_jvp_tf_chunk3_ms=113.0,
    rcm_jvp_tf_frame_ms=98.9,
    rcm_jvp_bc_chunk3_ms=56.2,
)


def cases(quick: bool):
    if quick:
        tpf, nf = 312, 7
    else:
        tpf, nf = TPF, 21
    L = tpf * nf
    return [
        ("dense", masks.full(L)),
        ("block_causal_frame", masks.block_causal(nf, tpf, 1)),
        ("block_causal_chunk3", masks.block_causal(nf, tpf, 3)),
        ("teacher_forcing_frame", masks.teacher_forcing(nf, tpf, 1)),
        ("teacher_forcing_chunk3", masks.teacher_forcing(nf, tpf, 3)),
    ]


def bench(fn, *args, n=10, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def make_inputs(spec, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (B, spec.q_len, H, D), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, spec.kv_len, H, D), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, spec.kv_len, H, D), jnp.bfloat16)
    t = [jax.random.normal(ks[3 + i], x.shape, jnp.bfloat16) for i, x in enumerate((q, k, v))]
    do = jax.random.normal(ks[6], q.shape, jnp.bfloat16)
    return q, k, v, t, do


def fns(spec, config):
    def fwd(q, k, v):
        return ops.attention(q, k, v, spec, impl="triton", ad="vjp", config=config)

    def fwdbwd(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return o, vjp(do)

    def jvp(q, k, v, tq, tk, tv):
        f = lambda q, k, v: ops.attention(
            q,
            k,
            v,
            spec,
            impl="triton",
            ad="jvp",  # noqa: E731
            config=config,
        )
        return jax.jvp(f, (q, k, v), (tq, tk, tv))

    return jax.jit(fwd), jax.jit(fwdbwd), jax.jit(jvp)


def cudnn_fns():
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    def fwdbwd(q, k, v, do):
        o, vjp = jax.vjp(fwd, q, k, v)
        return o, vjp(do)

    return jax.jit(fwd), jax.jit(fwdbwd)


def tflops(flops, ms):
    """`flops` per (batch, head) pair-count formula times B*H, over `ms`."""
    return flops * B * H / (ms * 1e-3) / 1e12


SWEEP = dict(
    # first sweep (H200, 2026-11-21) also tried fwd (128,128,8,2) 18.3 ms, (64,64,4,3) 17.0,
    # (128,32,4,3) 17.6 and index-list walking instead of ranges 21.1 ms (vs 16.1).
    fwd=[Tiles(128, 64, 8, 4), Tiles(128, 64, 4, 3), Tiles(128, 64, 8, 3), Tiles(128, 64, 4, 4)],
    jvp=[Tiles(64, 64, 4, 3), Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 2), Tiles(128, 32, 8, 2), Tiles(64, 32, 4, 3)],
    dkdv=[
        Tiles(64, 64, 4, 2),
        Tiles(64, 64, 4, 3),
        Tiles(64, 64, 8, 2),
        Tiles(32, 64, 4, 2),
        Tiles(64, 32, 4, 2),
        Tiles(128, 64, 8, 2),
    ],
    dq=[Tiles(128, 64, 8, 2), Tiles(64, 64, 4, 2), Tiles(64, 64, 4, 3), Tiles(128, 32, 4, 3), Tiles(128, 64, 4, 2)],
)


SWEEP_KERNELS: set = set()


def sweep(spec_list, base: FlashConfig, n, log):
    """Time each candidate of each kernel, greedily: each kernel's sweep runs with the
    kernels swept before it at their best tiles. Returns (rows, best config)."""
    out = []
    for cname, spec in spec_list:
        q, k, v, t, do = make_inputs(spec, 7)
        pairs = masks.allowed_pairs(spec)
        for kern, cands in SWEEP.items():
            if kern not in SWEEP_KERNELS:
                continue
            best = (float("inf"), base)
            for tile in cands:
                if tile == "no_ranges":
                    cfg, tile = dataclasses.replace(base, full_ranges=False), getattr(base, kern)
                else:
                    cfg = dataclasses.replace(base, **{kern: tile})
                fwd, fwdbwd, jvp = fns(spec, cfg)
                try:
                    if kern == "fwd":
                        ms = bench(fwd, q, k, v, n=n)
                        tf = tflops(4 * pairs * D, ms)
                    elif kern == "jvp":
                        ms = bench(jvp, q, k, v, *t, n=n)
                        tf = tflops(12 * pairs * D, ms)
                    else:
                        ms = bench(fwdbwd, q, k, v, do, n=n)
                        tf = tflops(14 * pairs * D, ms)
                except Exception as e:  # noqa: BLE001
                    ms, tf = float("nan"), float("nan")
                    log(f"  sweep {cname} {kern} {tile}: {type(e).__name__}: {str(e)[:200]}")
                row = dict(
                    case=cname,
                    kernel=kern,
                    tiles=dataclasses.asdict(tile),
                    ms=ms,
                    tflops=tf,
                    full_ranges=cfg.full_ranges,
                )
                out.append(row)
                log(
                    f"  sweep {cname:24s} {kern:5s} bq={tile.block_q:3d} bk={tile.block_k:3d} "
                    f"w={tile.num_warps} s={tile.num_stages} r={int(cfg.full_ranges)}: "
                    f"{ms:8.2f} ms {tf:6.1f} TF/s"
                )
                if ms < best[0]:
                    best = (ms, cfg)
            base = best[1]
    log(f"best config: {base}")
    return out, base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/bench_attention.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--sweep-cases", default="dense")
    ap.add_argument("--sweep-apply", action="store_true", help="benchmark with the best swept config")
    ap.add_argument("--sweep-kernels", default="fwd,jvp,dkdv,dq")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated case names to skip")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def log(s):
        print(s, flush=True)

    dev = jax.devices()[0].device_kind
    log(f"device: {dev}  jax {jax.__version__}")
    config = FlashConfig()
    log(f"config: {config}")
    result = dict(
        device=dev,
        jax=jax.__version__,
        config=dataclasses.asdict(config),
        flop_convention="fwd 4*pairs*D, fwd+bwd 14*pairs*D, jvp 12*pairs*D",
        anchors=ANCHORS,
        cases=[],
        sweep=[],
    )
    cl = cases(args.quick)
    skip = set(filter(None, args.skip.split(",")))

    SWEEP_KERNELS.update(args.sweep_kernels.split(","))
    if args.sweep or args.sweep_only:
        names = args.sweep_cases.split(",")
        sel = [c for c in cl if c[0] in names]
        result["sweep"], best = sweep(sel, config, max(3, args.n // 2), log)
        if args.sweep_apply:
            config = best
            result["config"] = dataclasses.asdict(config)
            log(f"using swept config: {config}")
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        if args.sweep_only:
            return

    L = cl[0][1].q_len
    try:
        q, k, v, _, do = make_inputs(masks.full(L), 0)
        cf, cfb = cudnn_fns()
        c_fwd = bench(cf, q, k, v, n=args.n)
        c_fb = bench(cfb, q, k, v, do, n=args.n)
    except Exception as e:  # noqa: BLE001
        log(f"cudnn failed: {type(e).__name__}: {str(e)[:300]}")
        c_fwd = c_fb = float("nan")
    pairs_dense = L * L
    result["cudnn"] = dict(
        L=L,
        fwd_ms=c_fwd,
        fwdbwd_ms=c_fb,
        fwd_tflops=tflops(4 * pairs_dense * D, c_fwd),
        fwdbwd_tflops=tflops(14 * pairs_dense * D, c_fb),
    )
    log(
        f"cudnn dense L={L}: fwd {c_fwd:.2f} ms ({result['cudnn']['fwd_tflops']:.0f} TF/s), "
        f"fwd+bwd {c_fb:.2f} ms ({result['cudnn']['fwdbwd_tflops']:.0f} TF/s)"
    )

    for seed, (name, spec) in enumerate(cl):
        if name in skip:
            continue
        pairs = masks.allowed_pairs(spec)
        density = pairs / (spec.q_len * spec.kv_len)
        q, k, v, t, do = make_inputs(spec, 100 + seed)
        fwd, fwdbwd, jvp = fns(spec, config)
        row = dict(case=name, q_len=spec.q_len, kv_len=spec.kv_len, pairs=pairs, density=density)
        for label, fn, a, fl in (
            ("fwd", fwd, (q, k, v), 4),
            ("fwdbwd", fwdbwd, (q, k, v, do), 14),
            ("jvp", jvp, (q, k, v, *t), 12),
        ):
            try:
                ms = bench(fn, *a, n=args.n)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                log(f"{name} {label} failed: {type(e).__name__}: {str(e)[:300]}")
                ms = float("nan")
            row[f"{label}_ms"] = ms
            row[f"{label}_tflops"] = tflops(fl * pairs * D, ms)
        row["jvp_over_fwd"] = row["jvp_ms"] / row["fwd_ms"]
        result["cases"].append(row)
        log(
            f"{name:24s} L={spec.q_len:6d} dens={density:.3f} fwd {row['fwd_ms']:8.2f} ms "
            f"({row['fwd_tflops']:5.0f} TF/s)  fwd+bwd {row['fwdbwd_ms']:8.2f} ms "
            f"({row['fwdbwd_tflops']:5.0f})  jvp {row['jvp_ms']:8.2f} ms "
            f"({row['jvp_tflops']:5.0f})  jvp/fwd {row['jvp_over_fwd']:.2f}"
        )
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    # Ratios vs targets.
    by = {r["case"]: r for r in result["cases"]}
    tg = {}
    if "dense" in by:
        d = by["dense"]
        tg["dense_fwd_over_cudnn"] = (d["fwd_ms"] / c_fwd, "<= 1.15")
        tg["dense_fwdbwd_over_cudnn"] = (d["fwdbwd_ms"] / c_fb, "<= 1.3")
        tg["dense_jvp_over_rcm_43.3ms"] = (d["jvp_ms"] / ANCHORS["rcm_jvp_dense_ms"], "<= 0.75")
    for r in result["cases"]:
        tg[f"{r['case']}_jvp_over_own_fwd"] = (r["jvp_over_fwd"], "<= 3.2")
        if "dense" in by and r["case"] != "dense":
            tg[f"{r['case']}_fwd_tflops_over_dense"] = (r["fwd_tflops"] / by["dense"]["fwd_tflops"], ">= 0.85")
    for key, anchor in (
        ("teacher_forcing_chunk3", "rcm_jvp_tf_chunk3_ms"),
        ("teacher_forcing_frame", "rcm_jvp_tf_frame_ms"),
        ("block_causal_chunk3", "rcm_jvp_bc_chunk3_ms"),
    ):
        if key in by:
            tg[f"{key}_jvp_speedup_vs_rcm"] = (ANCHORS[anchor] / by[key]["jvp_ms"], ">= 2")
    result["targets"] = {k: dict(value=v, target=t) for k, (v, t) in tg.items()}
    log("\n| target | value | goal |\n|---|---|---|")
    for k_, (v_, t_) in tg.items():
        log(f"| {k_} | {v_:.2f} | {t_} |")
    log(
        "\n| case | L | density | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | jvp ms | "
        "jvp TF/s | jvp/fwd |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    log(
        f"| cuDNN dense | {L} | 1.000 | {c_fwd:.2f} | {result['cudnn']['fwd_tflops']:.0f} | "
        f"{c_fb:.2f} | {result['cudnn']['fwdbwd_tflops']:.0f} | - | - | - |"
    )
    for r in result["cases"]:
        log(
            f"| {r['case']} | {r['q_len']} | {r['density']:.3f} | {r['fwd_ms']:.2f} | "
            f"{r['fwd_tflops']:.0f} | {r['fwdbwd_ms']:.2f} | {r['fwdbwd_tflops']:.0f} | "
            f"{r['jvp_ms']:.2f} | {r['jvp_tflops']:.0f} | {r['jvp_over_fwd']:.2f} |"
        )
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
