"""GPU correctness check of the Pallas-Triton flash kernels against the XLA reference.

Runs forward (O, LSE), backward (dQ, dK, dV) and JVP (O, Ȯ) for a few masks,
dtypes and head dims on the GPU, with poisoned (NaN-prefilled) outputs, and
compares with `attention_reference` computed in float32 at precision HIGHEST on
upcast inputs. Prints one line per case and writes JSON to `--out`.

    PYTHONPATH=. python3 experiments/attention_gpu_check.py --out /tmp/check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import masks, ops
from pallas_kernels.reference import attention_reference
from pallas_kernels.triton import FlashConfig, flash_backward, flash_forward, flash_jvp


def rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    fin = np.isfinite(b)
    return float(np.linalg.norm((a - b)[fin]) / max(np.linalg.norm(b[fin]), 1e-30))


def cases():
    tpf = 200  # not a multiple of any tile
    return [
        ("full_self", masks.full(3 * tpf), 128),
        ("full_cross_512", masks.full(3 * tpf, 512), 128),
        ("block_causal_frame", masks.block_causal(4, tpf, 1), 128),
        ("block_causal_chunk3", masks.block_causal(7, tpf, 3, 1), 128),
        (
            "block_causal_kvcache_local_sink",
            masks.block_causal(6, tpf, 1, q_frames=2, local_attn_blocks=2, sink_blocks=1),
            64,
        ),
        ("teacher_forcing_frame", masks.teacher_forcing(3, tpf, 1), 128),
        ("teacher_forcing_chunk3", masks.teacher_forcing(7, tpf, 3, 1), 64),
    ]


def run_case(name, spec, d, dtype, config, seed, interpret=False):
    B, H = 1, 3
    key = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(key[0], (B, spec.q_len, H, d), dtype)
    k = jax.random.normal(key[1], (B, spec.kv_len, H, d), dtype)
    v = jax.random.normal(key[2], (B, spec.kv_len, H, d), dtype)
    tq = jax.random.normal(key[3], q.shape, dtype)
    tk = jax.random.normal(key[4], k.shape, dtype)
    tv = jax.random.normal(key[5], v.shape, dtype)
    do = jax.random.normal(key[6], q.shape, dtype)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, spec)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        ro, rl = attention_reference(up(q), up(k), up(v), spec, return_lse=True)
        _, vjp = jax.vjp(ref, up(q), up(k), up(v))
        rdq, rdk, rdv = vjp(up(do))
        _, rto = jax.jvp(ref, (up(q), up(k), up(v)), (up(tq), up(tk), up(tv)))
    o, lse = flash_forward(q, k, v, spec, config=config, poison=True, interpret=interpret)
    dq, dk, dv = flash_backward(q, k, v, o, lse, do, spec, config=config, poison=True, interpret=interpret)
    o2, to, _ = flash_jvp(q, k, v, tq, tk, tv, spec, config=config, poison=True, interpret=interpret)
    # public op wiring on GPU (auto -> triton)
    f = lambda q, k, v: ops.attention(q, k, v, spec, ad="jvp", config=config, impl="triton", interpret=interpret)  # noqa: E731
    _, to_op = jax.jvp(f, (q, k, v), (tq, jnp.zeros_like(k), jnp.zeros_like(v)))
    with jax.default_matmul_precision("highest"):
        _, rto_q = jax.jvp(ref, (up(q), up(k), up(v)), (up(tq), up(k) * 0, up(v) * 0))
    g = jax.grad(
        lambda q: jnp.sum(
            ops.attention(q, k, v, spec, config=config, impl="triton", interpret=interpret).astype(jnp.float32) * up(do)
        )
    )(q)
    errs = dict(
        o=rel(o, ro),
        lse=rel(lse, rl),
        dq=rel(dq, rdq),
        dk=rel(dk, rdk),
        dv=rel(dv, rdv),
        jvp_o=rel(o2, ro),
        jvp_to=rel(to, rto),
        op_jvp_q_only=rel(to_op, rto_q),
        op_grad_q=rel(g, rdq),
    )
    return errs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results/attention_gpu_check.json")
    ap.add_argument("--interpret", action="store_true", help="CPU dry run, small tiles")
    ap.add_argument("--max-cases", type=int, default=100)
    ap.add_argument("--cases", default="", help="comma-separated case names (default all)")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    print("device:", jax.devices()[0].device_kind, "backend:", jax.default_backend(), flush=True)
    config = FlashConfig.uniform(64) if args.interpret else None  # dtype default
    results = []
    seed = int(time.time()) % 100000
    ok_all = True
    sel = set(filter(None, args.cases.split(",")))
    for name, spec, d in [c for c in cases() if not sel or c[0] in sel][: args.max_cases]:
        for dtype in [jnp.dtype(x) for x in args.dtypes.split(",")]:
            seed += 1
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
            t0 = time.time()
            try:
                errs = run_case(name, spec, d, dtype, config, seed, args.interpret)
                worst = max(errs.values())
                ok = bool(np.isfinite(worst) and worst < tol)
                err_s = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                errs, ok, err_s = {}, False, f"ERROR {type(e).__name__}: {str(e)[:300]}"
            ok_all &= ok
            dt = jnp.dtype(dtype).name
            print(f"{'PASS' if ok else 'FAIL'} {name:34s} d={d} {dt:8s} {err_s} ({time.time() - t0:.1f}s)", flush=True)
            results.append(dict(case=name, d=d, dtype=dt, tol=tol, ok=ok, errors=errs, seed=seed))
    with open(args.out, "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, results=results), fh, indent=1)
    print("ALL PASS" if ok_all else "SOME FAILED", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
