"""Does XLA fold the FFN's bias + tanh-GELU into the first GEMM's epilogue (issue 7)?

The streaming profile (session 9, H100) shows the FFN's tanh-GELU as its own elementwise pass
(`loop_multiply_fusion`, 66 us per layer and call: a 4,680 x 8,960 bf16 read and write), after a
cuBLAS GEMM that already takes the bias. XLA's GEMM rewriter can fold an approximate GELU into a
cuBLASLt epilogue when the HLO matches its pattern. This compiles the `wan_1_3b` FFN of one chunk
(x [4680, 1536] bf16 -> 8960 -> 1536, with biases) in a few variants, reports whether the optimized
HLO has a GELU epilogue, the kernels XLA emits, the median time, and the error against the
float32 reference on random inputs.

    PYTHONPATH=. python3 experiments/ffn_epilogue_check.py --out $OUT/ffn_epilogue.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

M, D, F = 4680, 1536, 8960
C1, C2 = float(np.sqrt(2 / np.pi)), 0.044715


def gelu_jax(h):
    return jax.nn.gelu(h, approximate=True)


def gelu_pattern(h):
    """The GEMM rewriter's form, spelled out: h * (0.5 * (1 + tanh(c1 * (h + c2 * (h * (h * h))))))."""
    return h * (0.5 * (1.0 + jnp.tanh(C1 * (h + C2 * (h * (h * h))))))


def ffn(gelu, out_f32=False):
    def f(x, w1, b1, w2, b2):
        if out_f32:
            h = jnp.dot(x, w1, preferred_element_type=jnp.float32) + b1.astype(jnp.float32)
            g = gelu(h).astype(x.dtype)
        else:
            g = gelu(jnp.dot(x, w1) + b1)
        return jnp.dot(g, w2) + b2

    return f


VARIANTS = {
    "jax_gelu": (ffn(gelu_jax), {}),
    "jax_gelu_lt": (ffn(gelu_jax), {"xla_gpu_enable_cublaslt": True}),
    "pattern": (ffn(gelu_pattern), {}),
    "pattern_lt": (ffn(gelu_pattern), {"xla_gpu_enable_cublaslt": True}),
    "f32_pattern_lt": (ffn(gelu_pattern, out_f32=True), {"xla_gpu_enable_cublaslt": True}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ffn_epilogue.json")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke test)")
    args = ap.parse_args()
    global M, D, F
    if args.quick:
        M, D, F = 64, 32, 48
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(ks[0], (M, D), jnp.bfloat16)
    w1 = (jax.random.normal(ks[1], (D, F)) * D**-0.5).astype(jnp.bfloat16)
    b1 = (0.1 * jax.random.normal(ks[2], (F,))).astype(jnp.bfloat16)
    w2 = (jax.random.normal(ks[3], (F, D)) * F**-0.5).astype(jnp.bfloat16)
    b2 = (0.1 * jax.random.normal(ks[4], (D,))).astype(jnp.bfloat16)
    args_ = (x, w1, b1, w2, b2)
    f32 = [a.astype(jnp.float32) for a in args_]
    hp = jax.lax.Precision.HIGHEST
    ref = np.asarray(jnp.dot(gelu_jax(jnp.dot(f32[0], f32[1], precision=hp) + f32[2]), f32[3], precision=hp) + f32[4])
    rows = []
    for name, (fn, opts) in VARIANTS.items():
        try:
            compiled = jax.jit(fn).lower(*args_).compile(compiler_options=opts or None)
            hlo = compiled.as_text()
            targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
            epilogues = sorted(set(re.findall(r'"epilogue":"([A-Z_]+)"', hlo)))
            fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", hlo, re.M))
            out = np.asarray(compiled(*args_), np.float32)
            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            for _ in range(3):
                compiled(*args_).block_until_ready()
            ts = []
            for _ in range(30):
                t0 = time.perf_counter()
                compiled(*args_).block_until_ready()
                ts.append(time.perf_counter() - t0)
            row = dict(
                variant=name,
                options=opts,
                ms=statistics.median(ts) * 1e3,
                rel_err=err,
                custom_calls=targets,
                epilogues=epilogues,
                fusions=fusions,
            )
        except Exception as e:  # noqa: BLE001 -- report and go on
            row = dict(variant=name, options=opts, error=f"{type(e).__name__}: {str(e)[:500]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| variant | ms | GELU epilogue | custom calls | other fusions | rel err |\n|---|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            print(
                f"| {r['variant']} | {r['ms']:.3f} | {','.join(r['epilogues']) or '-'} | "
                f"{','.join(r['custom_calls'])} | {r['fusions']} | {r['rel_err']:.1e} |"
            )
        else:
            print(f"| {r['variant']} | failed: {r['error'][:80]} |")
    with open(args.out, "w") as fh:
        json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, shape=[M, D, F], rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
