"""Forward-pass baseline of the Wan2.1 DiT on a GPU (random weights).

  python experiments/bench_model.py [--model wan_1_3b] [--frames 21] [--impl cudnn] [--out FILE]

Builds the model in bf16 with random weights and times the forward pass at 480p
(latent 60 x 104 -> 30 x 52 = 1560 tokens per frame) for the given latent frames,
B = 1, 512 text tokens: median of N timed runs after warm-up (block_until_ready),
peak device memory, and model TFLOP/s (matmul FLOPs of one forward).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from crm_jax.models.config import get_model_config
from crm_jax.models.wan import AttentionPattern, functional, init_model


def forward_flops(cfg, tokens: int, text: int, attn_pairs: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add); attention counts allowed pairs."""
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_layer = (
        2 * tokens * d * d * 4  # self-attn q, k, v, o
        + 2 * tokens * d * d * 2  # cross-attn q, o
        + 2 * text * d * d * 2  # cross-attn k, v
        + 2 * tokens * d * f * 2  # FFN
        + 4 * attn_pairs * d  # self-attn QK^T and PV
        + 4 * tokens * text * d
    )  # cross-attn
    return layers * per_layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="wan_1_3b")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    ap.add_argument("--impl", default="cudnn")
    ap.add_argument("--pattern", default="full", choices=["full", "block_causal"])
    ap.add_argument("--block_frames", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/bench_model.json")
    args = ap.parse_args()

    cfg = get_model_config(args.model, dtype="bfloat16", param_dtype="bfloat16", attn_impl=args.impl)
    t0 = time.time()
    apply, params = functional(init_model(cfg, 0))
    params = jax.block_until_ready(params)
    init_s = time.time() - t0
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (1, args.frames, args.height, args.width, cfg.in_channels), jnp.bfloat16)
    t = jax.random.uniform(k[1], (1, args.frames))
    ctx = jax.random.normal(k[2], (1, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    pattern = AttentionPattern(args.pattern, args.block_frames) if args.pattern != "full" else AttentionPattern()
    fwd = jax.jit(lambda p, x, t, c: apply(p, x, t, c, pattern=pattern))
    t0 = time.time()
    jax.block_until_ready(fwd(params, x, t, ctx))
    compile_s = time.time() - t0
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, x, t, ctx))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    from pallas_kernels import masks

    spec = pattern.mask_spec(args.frames, (args.height // 2) * (args.width // 2))
    flops = forward_flops(cfg, tokens, cfg.text_len, masks.allowed_pairs(spec))
    stats = jax.devices()[0].memory_stats() or {}
    res = dict(
        device=jax.devices()[0].device_kind,
        model=args.model,
        impl=args.impl,
        pattern=args.pattern,
        frames=args.frames,
        tokens=tokens,
        params=int(sum(p.size for p in jax.tree.leaves(params))),
        init_s=round(init_s, 2),
        compile_s=round(compile_s, 2),
        forward_ms_median=round(med * 1e3, 2),
        forward_ms_all=[round(t * 1e3, 2) for t in times],
        model_tflops=round(flops / med / 1e12, 1),
        peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
    )
    print("| device | model | attention | tokens | forward ms (median) | TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {res['device']} | {args.model} | {args.impl}/{args.pattern} | {tokens} | {res['forward_ms_median']} "
        f"| {res['model_tflops']} | {res['peak_gib']} |"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
