"""Wan2.1 VAE streaming-decode benchmark: time per latent frame and peak memory.

    PYTHONPATH=. python experiments/bench_vae.py --out results/bench_vae.json        # GPU
    PYTHONPATH=. python experiments/bench_vae.py --tiny --out /tmp/bench_vae.json    # CPU smoke test

Default (GPU): the real Wan2.1 VAE config (`WAN_VAE`, 127M parameters) with random
weights, bf16 compute and parameters, B = 1, a 480p latent (60x104, 16 channels ->
480x832 video), `--frames` latent frames (21 -> 81 video frames), decoded with
`StreamingDecoder` (pure jitted step over fixed-shape feature caches, state donated)
for each chunk size in `--chunks` (latent frames per step).

Per chunk size: one warm-up video (compiles the first-chunk and the later-chunk step;
compile time reported), then `--repeats` timed videos, every step `block_until_ready`-ed:
  first_chunk_ms:   the first step (first latent frame decodes to 1 video frame, so
                    it is cheaper per latent frame)
  ms_per_latent_frame: median over later steps of step time / chunk size
  video_fps:        video frames per second over later steps
  total_s:          one whole video (median over repeats)
peak_mem_gb: the device's `peak_bytes_in_use` (process-wide high-water mark, so it
grows monotonically across chunk sizes; absent where memory_stats() is unsupported, e.g. CPU).
--tiny: the TINY_VAE test config, float32, 4x6 latents, 4 frames (checks it runs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
from flax import nnx

from crm_jax.models.vae import TINY_VAE, WAN_VAE, StreamingDecoder, WanVAE


def peak_mem_gb():
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**30


def run_video(dec, z, chunk):
    """Decode `z` chunk by chunk; returns [(latent frames, video frames, seconds)] per step."""
    state = dec.init(z.shape[0], z.shape[2], z.shape[3])
    jax.block_until_ready(state)
    steps = []
    for s in range(0, z.shape[1], chunk):
        zc = z[:, s : s + chunk]
        jax.block_until_ready(zc)
        t0 = time.perf_counter()
        y, state = dec.step(state, zc)
        y.block_until_ready()
        steps.append((zc.shape[1], y.shape[1], time.perf_counter() - t0))
    return steps


def bench(args):
    if args.tiny:
        cfg, (h, w), frames, dtype = TINY_VAE, (4, 6), min(args.frames, 4), "float32"
    else:
        cfg, (h, w), frames, dtype = WAN_VAE, (args.height, args.width), args.frames, args.dtype
    cfg = cfg.replace(dtype=dtype, param_dtype=args.param_dtype or dtype)
    t0 = time.perf_counter()
    vae = WanVAE(cfg, rngs=nnx.Rngs(args.seed))
    jax.block_until_ready(nnx.state(vae))
    init_s = time.perf_counter() - t0
    z = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, frames, h, w, cfg.z_dim), jnp.float32)
    donate = jax.devices()[0].platform != "cpu"
    rows = []
    for chunk in args.chunks:
        dec = StreamingDecoder(vae, donate_state=donate)
        t0 = time.perf_counter()
        run_video(dec, z, chunk)  # warm-up: compiles the first and the later step (and a shorter tail)
        compile_s = time.perf_counter() - t0
        firsts, per_frame, fps, totals = [], [], [], []
        for _ in range(args.repeats):
            steps = run_video(dec, z, chunk)
            firsts.append(steps[0][2] * 1e3)
            later = [s for s in steps[1:] if s[0] == chunk] or steps[1:]
            per_frame += [1e3 * sec / n for n, _, sec in later]
            if later:
                fps.append(sum(v for _, v, _ in later) / sum(sec for _, _, sec in later))
            totals.append(sum(sec for _, _, sec in steps))
        rows.append(
            dict(
                chunk=chunk,
                first_chunk_ms=statistics.median(firsts),
                ms_per_latent_frame=statistics.median(per_frame) if per_frame else None,
                video_fps=statistics.median(fps) if fps else None,
                total_s=statistics.median(totals),
                warmup_s=compile_s,
                peak_mem_gb=peak_mem_gb(),
            )
        )
    return dict(
        device=str(jax.devices()[0]),
        platform=jax.devices()[0].platform,
        config="tiny" if args.tiny else "wan2.1",
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        batch=args.batch,
        latent_hw=[h, w],
        latent_frames=frames,
        video_shape=[args.batch, 1 + 4 * (frames - 1), 8 * h, 8 * w, 3],
        init_s=init_s,
        repeats=args.repeats,
        rows=rows,
    )


def print_table(res):
    print(
        f"{res['config']} VAE, {res['dtype']}, B={res['batch']}, latent {res['latent_frames']}x"
        f"{res['latent_hw'][0]}x{res['latent_hw'][1]} -> video {res['video_shape'][1:4]} on {res['device']}"
    )
    head = (
        f"{'chunk':>5} {'first_ms':>10} {'ms/lat_frame':>12} {'video_fps':>10} {'total_s':>9} "
        f"{'warmup_s':>9} {'peak_GB':>8}"
    )
    print(head)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in res["rows"]:
        print(
            f"{r['chunk']:>5} {fmt(r['first_chunk_ms'], '10.1f')} {fmt(r['ms_per_latent_frame'], '12.1f')} "
            f"{fmt(r['video_fps'], '10.2f')} {fmt(r['total_s'], '9.3f')} {fmt(r['warmup_s'], '9.1f')} "
            f"{fmt(r['peak_mem_gb'], '8.2f')}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config, small latents (CPU smoke test)")
    ap.add_argument("--frames", type=int, default=21, help="latent frames (21 -> 81 video frames)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--chunks",
        type=lambda s: [int(c) for c in s.split(",")],
        default=[1, 3],
        help="comma-separated latent frames per step",
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--param_dtype", default=None, help="default: --dtype")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    res = bench(args)
    print_table(res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
