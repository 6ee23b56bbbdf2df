"""Attention over the streaming KV cache, kernel against kernel (issue 7).

The shapes of one cached call of `wan_1_3b` at 480p, chunk 3: B = 1, 12 heads, head_dim 128,
bf16, a chunk of 4,680 queries (3 frames x 1,560 tokens) over the first n chunks of a layer's
7-chunk cache buffer (n = 1..7: 4,680..32,760 valid keys; the n-th chunk is the chunk itself).
The valid length is a traced argument for `cudnn` and `ours_*` (one compile serves every n),
as in the sampler. Kernels:

  cudnn         what the sampler ran before: cuDNN over the whole buffer with a valid length
                (`jax.nn.dot_product_attention(key_value_seq_lengths=...)`)
  ours_*        `pallas_kernels.mgpu.prefix_attention` (Pallas Mosaic GPU, warp-specialised,
                TMA + wgmma, bf16) with the named tiling: sK = K key splits merged by
                log-sum-exp, kvN = keys per tile, stN = pipeline stages, nosched = without
                the consumer ping-pong barrier
  lib_s2        (float16: the library kernel's shared memory is float16; bf16 -> f16 is exact
                for these inputs) jax's own Hopper flash attention in Pallas Mosaic GPU
                (`jax.experimental.pallas.ops.gpu.attention_mgpu`) on a cache whose chunks are
                padded to 4,736 slots (a multiple of 128; the dead slots hold k = v = 0, and
                their weight, exactly 1 each in the softmax sum, is taken out of the kernel's
                log-sum-exp afterwards), queries padded to 4,736, keys split 2 ways along
                the batch axis; a reference for what a Mosaic-GPU FA3 reaches here

For each, the median time of one call per n (10 calls in one jitted loop, so launch gaps are
amortised as in the model; warm-up; `block_until_ready`), useful TFLOP/s
(4 * 4680 * keys * 128 * 12 per call), and "per chunk": the time of the 2 calls x 30 layers a
2-step noisy chunk makes, averaged over the 7 chunks of a 21-frame video (compare with the
profile's attention row, 65.1 ms per chunk in gpu_run16). Every variant but cuDNN is checked
against a float32 XLA reference on fresh random inputs per n (relative Frobenius error; a
kernel that left rows unwritten or read past the length fails it). A dense row (L = 32,760
self-attention, the docs/design.md §3 anchor: cuDNN 12.1 ms on an H200) is timed last.

    PYTHONPATH=. python3 experiments/bench_cache_attention.py --out $OUT/bench_cache_attention.json
    ... --only cudnn,ours_s2  a subset of the variants
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mgpu import PrefixConfig, prefix_attention, prefix_attention_reference

H, D, TPF, CHUNK_FRAMES, CHUNKS = 12, 128, 1560, 3, 7
CALLS_PER_CHUNK = 2 * 30  # 2 steps x 30 layers (noisy context)
OURS = {
    "ours_s1": PrefixConfig(splits=1),
    "ours_s2": PrefixConfig(splits=2),
    "ours_s3": PrefixConfig(splits=3),
    "ours_s2_kv64_st4": PrefixConfig(block_kv=64, stages=4, splits=2),
    "ours_s2_nosched": PrefixConfig(splits=2, schedule_barrier=False),
}


def bench(fn, q, *args, n=10, reps=10, warmup=2):
    """Median ms of one `fn(q, *args)`: `reps` calls in one jitted loop (each on its own copy of
    q, so none can be hoisted), timed `n` times with `block_until_ready`, divided by reps."""
    qs = jnp.stack([q * (1 + 1e-3 * i) for i in range(reps)])

    @jax.jit
    def loop(qs, *args):
        def body(i, acc):
            return acc + jnp.sum(fn(qs[i], *args).astype(jnp.float32))  # all of it is used

        return jax.lax.fori_loop(0, reps, body, jnp.float32(0))

    for _ in range(warmup):
        jax.block_until_ready(loop(qs, *args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(qs, *args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3 / reps


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def padded_cache(k, chunk, slot, chunks):
    """`[1, chunks*chunk, H, D]` -> `[1, chunks*slot, H, D]`: each chunk's keys then zeros."""
    k = k.reshape(1, chunks, chunk, H, D)
    k = jnp.pad(k, ((0, 0), (0, 0), (0, slot - chunk), (0, 0), (0, 0)))
    return k.reshape(1, chunks * slot, H, D)


def lib_cache_attention(q, k, v, dead, split, config):
    """The library kernel on q `[1, Lq, H, D]` over all of k, v `[1, S, H, D]`
    (S % (split * block_kv) == 0), of which `dead` keys are k = v = 0 and must not count."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    lq, s = q.shape[1], k.shape[1]
    qs = (q.astype(jnp.float32) * D**-0.5).astype(q.dtype)  # the kernel does not scale
    qs = jnp.broadcast_to(qs, (split, lq, H, D))
    k = k.reshape(split, s // split, H, D)
    v = v.reshape(split, s // split, H, D)
    out, (lse,) = attention_mgpu.attention(qs, k, v, config, save_residuals=True)
    lse = jnp.transpose(lse, (0, 2, 1))[..., None]  # [split, Lq, H, 1], log2
    m = jnp.max(lse, axis=0)
    w = jnp.exp2(lse - m)
    z = jnp.sum(w, axis=0) - dead * jnp.exp2(-m)  # a dead key's exp(q.0) = 1
    o = jnp.sum(out.astype(jnp.float32) * w, axis=0) / z
    return o[None].astype(q.dtype)


def inputs(seed, lq, s):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (
        jax.random.normal(ks[0], (1, lq, H, D), jnp.bfloat16),
        jax.random.normal(ks[1], (1, s, H, D), jnp.bfloat16),
        jax.random.normal(ks[2], (1, s, H, D), jnp.bfloat16),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/bench_cache_attention.json")
    ap.add_argument("--n", type=int, default=20, help="timed runs per case")
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--no_dense", action="store_true")
    args = ap.parse_args()
    chunk = TPF * CHUNK_FRAMES
    slot = -(-chunk // 128) * 128
    dev = jax.devices()[0]
    print(
        f"device {dev} ({getattr(dev, 'device_kind', '?')}, {getattr(dev, 'core_count', '?')} SMs); chunk "
        f"{chunk} queries, {CHUNKS} chunks, {H} heads x {D}, bf16",
        flush=True,
    )
    q, k, v = inputs(0, chunk, CHUNKS * chunk)

    def cudnn(q, k, v, n):
        lens = jnp.full((1,), n, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lens, implementation="cudnn")

    # variant -> make(n, q, k, v) -> (fn, fn_args); checked: whether to compare with the reference
    variants = {"cudnn": (lambda n, q, k, v: (cudnn, (q, k, v, jnp.int32(n * chunk))), False)}
    for name, cfg in OURS.items():
        f = lambda q, k, v, n, cfg=cfg: prefix_attention(q, k, v, n, config=cfg)
        variants[name] = (lambda n, q, k, v, f=f: (f, (q, k, v, jnp.int32(n * chunk))), True)

    def lib(n, q, k, v, split=2):
        from jax.experimental.pallas.ops.gpu import attention_mgpu

        config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
        kp, vp = padded_cache(k, chunk, slot, CHUNKS), padded_cache(v, chunk, slot, CHUNKS)
        s = -(-n * slot // (split * 128)) * split * 128
        tail = ((0, 0), (0, s - n * slot), (0, 0), (0, 0))
        kk, vv = jnp.pad(kp[:, : n * slot], tail), jnp.pad(vp[:, : n * slot], tail)
        qpad = jnp.pad(q, ((0, 0), (0, slot - chunk), (0, 0), (0, 0)))
        fn = lambda q, k, v: lib_cache_attention(q, k, v, s - n * chunk, split, config)[:, :chunk]
        f16 = jnp.float16
        return fn, (qpad.astype(f16), kk.astype(f16), vv.astype(f16))

    variants["lib_s2"] = (lib, True)
    if args.only:
        keep = args.only.split(",")
        variants = {k_: v_ for k_, v_ in variants.items() if k_ in keep}

    rows = []
    for name, (make, check) in variants.items():
        per_n = {}
        for n in range(1, CHUNKS + 1):
            try:
                err = None
                if check:  # fresh inputs per n: stale outputs of an earlier run cannot pass
                    cq, ck, cv = inputs(100 + n, chunk, CHUNKS * chunk)
                    f, fargs = make(n, cq, ck, cv)
                    got = np.asarray(jax.jit(f)(*fargs), np.float32)
                    ref = np.asarray(prefix_attention_reference(cq, ck, cv, n * chunk))
                    err = rel(got, ref) if np.isfinite(got).all() else float("inf")
                f, fargs = make(n, q, k, v)
                ms = bench(f, *fargs, n=args.n)
                flops = 4 * chunk * n * chunk * D * H
                per_n[n] = dict(ms=ms, tflops=flops / ms / 1e9, rel_err=err)
                print(
                    f"  {name:18s} n={n} keys={n * chunk:6d} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s"
                    + (f" rel_err {err:.2e}" if err is not None else ""),
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 -- one failing kernel must not end the comparison
                print(f"  {name} n={n}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
                traceback.print_exc(limit=4)
                per_n[n] = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
                break
        done = [r for r in per_n.values() if "ms" in r]
        row = dict(variant=name, per_n=per_n)
        if len(done) == CHUNKS:
            row["per_chunk_ms"] = sum(r["ms"] for r in done) * CALLS_PER_CHUNK / CHUNKS
            row["useful_tflops"] = (
                sum(4 * chunk * n * chunk * D * H for n in range(1, CHUNKS + 1)) / sum(r["ms"] for r in done) / 1e9
            )
        rows.append(row)

    dense = []
    if not args.no_dense:
        L = CHUNKS * chunk
        dq, dk, dv = inputs(7, L, L)
        flops = 4 * L * L * D * H
        cands = [("cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"), False)]
        cands += [
            (nm, (lambda q, k, v, cfg=OURS[nm]: prefix_attention(q, k, v, L, config=cfg)), True)
            for nm in ("ours_s1", "ours_s2")
            if nm in variants
        ]
        for name, fn, check in cands:
            try:
                err = None
                if check:
                    got = np.asarray(jax.jit(fn)(dq, dk, dv), np.float32)
                    # reference on a query slice (the full score matrix is 51 GB in float32)
                    ref = np.asarray(prefix_attention_reference(dq[:, ::16], dk, dv, L))
                    err = rel(got[:, ::16], ref)
                ms = bench(fn, dq, dk, dv, n=5, reps=3)
                dense.append(dict(variant=name, L=L, ms=ms, tflops=flops / ms / 1e9, rel_err=err))
                print(
                    f"  dense {name:10s} L={L} {ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s"
                    + (f" rel_err {err:.2e}" if err is not None else ""),
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                print(f"  dense {name}: FAILED {type(e).__name__}: {str(e)[:1000]}", flush=True)
                dense.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:1000]}"))

    print("\n| kernel | ms per 2-step noisy chunk (60 calls) | useful TFLOP/s | n=1 / n=7 TFLOP/s | worst rel err |")
    print("|---|---|---|---|---|")
    for r in rows:
        errs = [x["rel_err"] for x in r["per_n"].values() if x.get("rel_err") is not None]
        ends = "/".join(f"{r['per_n'][n]['tflops']:.0f}" if "tflops" in r["per_n"].get(n, {}) else "-" for n in (1, 7))
        print(
            f"| {r['variant']} | {r.get('per_chunk_ms', float('nan')):.1f} | "
            f"{r.get('useful_tflops', float('nan')):.0f} | {ends} | {max(errs) if errs else float('nan'):.1e} |"
        )
    for d in dense:
        if "ms" in d:
            err = "" if d["rel_err"] is None else f"{d['rel_err']:.1e}"
            print(f"| dense {d['variant']} L={d['L']} | {d['ms']:.2f} ms | {d['tflops']:.0f} | | {err} |")
    with open(args.out, "w") as fh:
        json.dump(
            dict(
                device=str(dev),
                device_kind=getattr(dev, "device_kind", None),
                jax=jax.__version__,
                chunk=chunk,
                rows=rows,
                dense=dense,
            ),
            fh,
            indent=1,
        )
    print("wrote", args.out)


if __name__ == "__main__":
    main()
