"""Streaming benchmark: time to first chunk, steady-state latent frames/s, peak memory.

    python experiments/bench_streaming.py --out results/bench_streaming.json        # GPU
    python experiments/bench_streaming.py --quick --out /tmp/bench_quick.json       # CPU smoke test

Default (GPU): `wan_1_3b` dimensions, random weights, bf16, 480p (latent 60x104 ->
30x52 = 1560 tokens/frame), 21 latent frames, B = 1, chunk 3 and frame-wise, 1/2/4
steps, clean- vs noisy-context, DiT only (no VAE, no text encoder); then the same
table for the tiny toy-world model (12-channel 16x16 latents, 21 frames, with actions).
Attention uses the config's `attn_impl` ("auto": the Pallas kernels where available).

Per configuration: one warm-up video (compiles every cache layout), then `--repeats`
timed pairs of videos, each chunk `block_until_ready`-ed as it is yielded:
  first_chunk_ms: stream() call -> first chunk ready (latency a viewer sees)
  steady_fps:     latent frames after the first chunk / time from first to last chunk
                  ready, chunks dispatched one at a time (host gaps between chunks included)
  overall_fps:    all frames / total time, same run
  *_prefetch:     the same with prefetch (chunk i+1 dispatched before chunk i is handed
                  over, hiding host work; on CPU dispatch is not asynchronous, ignore these)
(medians over repeats). peak_mem_gb is the device's `peak_bytes_in_use` after the
configuration; it is a process-wide high-water mark, so use --isolate (one subprocess
per configuration) for per-configuration peaks.

Compile time: the model takes `cache_frames` as a static int, so every cache length is
its own executable -- chunk 3 over 21 frames compiles 7 chunk functions, frame-wise 21
(shared by all step counts and both context modes). If that does not fit one run, split
it (`--blocks 3`, then `--blocks 1`) and pass `--compile_cache DIR` so reruns reuse them. --profile DIR writes a jax.profiler
trace of one timed video of the first configuration (view in TensorBoard/Perfetto) and prints
where the kernel time of a chunk goes (experiments/trace_summary.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import trace_summary
from crm_jax.models.config import get_model_config
from crm_jax.models.wan import AttentionPattern, functional, init_model
from crm_jax.sampling import StreamingSampler
from crm_jax.sampling.plan import chunk_bounds

# Self Forcing (PyTorch, torch SDPA) on one H200, 2026-11-21, chunk 3: latent frames/s x 1.6.
TARGETS = {(3, 4, "clean"): 11.5, (3, 2, "clean"): 19.0, (3, 2, "noisy"): 27.0}


def model_setups(args):
    """[(name, cfg, latent_hw, frames, with_actions)] to benchmark."""
    if args.quick:
        cfg = get_model_config("tiny", in_channels=12, out_channels=12, num_actions=5)
        return [("tiny", cfg, (8, 8), 6, True)]
    setups = []
    if "wan_1_3b" in args.models:
        cfg = get_model_config("wan_1_3b", dtype=args.dtype, param_dtype=args.dtype)
        setups.append(("wan_1_3b", cfg, tuple(args.latent_hw), args.frames, False))
    if "tiny" in args.models:
        cfg = get_model_config("tiny", in_channels=12, out_channels=12, num_actions=5,
                               dtype=args.dtype, param_dtype=args.dtype)
        setups.append(("tiny", cfg, (16, 16), args.frames, True))
    return setups


def peak_memory_gb():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2 ** 30


def time_video(sampler, key, context, frames, actions, prefetch):
    """(first_chunk_s, steady_fps, overall_fps) of one streamed video."""
    t0 = time.perf_counter()
    ready, counts = [], []
    for c in sampler.stream(key, context, frames, actions, prefetch=prefetch):
        c.frames.block_until_ready()
        ready.append(time.perf_counter() - t0)
        counts.append(c.frames.shape[1])
    steady = (sum(counts[1:]) / (ready[-1] - ready[0])) if len(ready) > 1 else float("nan")
    return ready[0], steady, frames / ready[-1]


def timed(sampler, key, context, frames, actions):
    """One video without prefetch (latency, steady state incl. host gaps) and one with (pipelined)."""
    first, steady, overall = time_video(sampler, key, context, frames, actions, False)
    _, steady_pf, overall_pf = time_video(sampler, key, context, frames, actions, True)
    return first, steady, overall, steady_pf, overall_pf


def bench_one(name, cfg, latent_hw, frames, with_actions, block, steps, mode, args, model_cache):
    if name not in model_cache:
        t = time.perf_counter()
        model_cache.clear()                                  # one model on the device at a time
        apply, params = functional(init_model(cfg, seed=0))
        jax.block_until_ready(params)
        model_cache[name] = (apply, params, time.perf_counter() - t)
    apply, params, _ = model_cache[name]
    pattern = AttentionPattern("block_causal", block)
    sampler = StreamingSampler(apply, params, cfg, pattern, latent_hw, 1, steps, mode)
    key = jax.random.key(0)
    context = jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim), jnp.float32)
    actions = (np.random.default_rng(0).integers(0, cfg.num_actions, (1, frames)) if with_actions else None)
    t = time.perf_counter()
    sampler.generate(key, context, frames, actions).block_until_ready()
    warmup = time.perf_counter() - t
    runs = []
    for r in range(args.repeats):
        if args.profile and r == 0 and not args._profiled:
            args._profiled = True
            with jax.profiler.trace(args.profile, create_perfetto_trace=True):
                runs.append(timed(sampler, key, context, frames, actions))
            chunks = len(list(chunk_bounds(pattern, frames)))
            try:   # two videos were traced (with and without prefetch): time per chunk
                prof = trace_summary.summarize(args.profile, per=2 * chunks)
                print(f"profile ({name}, chunk {block}, {steps} steps, {mode}), per chunk:\n"
                      + trace_summary.fmt(prof), flush=True)
            except (ValueError, FileNotFoundError) as e:
                prof = None
                print(f"profile summary failed: {e}", flush=True)
        else:
            runs.append(timed(sampler, key, context, frames, actions))
    first, steady, overall, steady_pf, overall_pf = (statistics.median(x) for x in zip(*runs))
    tpf = sampler.tpf
    row = dict(model=name, latent_hw=list(latent_hw), tokens_per_frame=tpf, frames=frames, block_frames=block,
               steps=steps, context=mode, first_chunk_ms=first * 1e3, steady_fps=steady, overall_fps=overall,
               steady_fps_prefetch=steady_pf, overall_fps_prefetch=overall_pf,
               warmup_s=warmup, peak_mem_gb=peak_memory_gb(), repeats=args.repeats,
               cache_gb=cfg.num_layers * frames * tpf * cfg.dim * 2 * jnp.dtype(cfg.compute_dtype).itemsize / 2 ** 30)
    if args.profile and args._profiled is True:
        args._profiled = "done"
        row["profile_per_chunk"] = prof
    target = TARGETS.get((block, steps, mode)) if name == "wan_1_3b" else None
    if target is not None:
        row.update(target_fps=target, meets_target=bool(steady >= target))
    return row


def fmt(rows):
    head = (f"{'model':9s} {'chunk':>5s} {'steps':>5s} {'context':>7s} {'first ms':>9s} {'steady f/s':>10s} "
            f"{'overall f/s':>11s} {'peak GB':>8s} {'target':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        tgt = "" if "target_fps" not in r else f"{r['target_fps']:.1f}{' ok' if r['meets_target'] else ' MISS'}"
        lines.append(f"{r['model']:9s} {r['block_frames']:5d} {r['steps']:5d} {r['context']:>7s} "
                     f"{r['first_chunk_ms']:9.1f} {r['steady_fps']:10.2f} {r['overall_fps']:11.2f} {peak:>8s} {tgt:>7s}")
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--quick", action="store_true", help="tiny model, small sizes (CPU sanity check)")
    p.add_argument("--models", default="wan_1_3b,tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--latent_hw", default="60,104")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--blocks", default="3,1", help="chunk sizes in latent frames (1 = frame-wise)")
    p.add_argument("--steps", default="1,2,4")
    p.add_argument("--contexts", default="clean,noisy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--isolate", action="store_true", help="one subprocess per configuration (exact peaks)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)   # model:block:steps:context (--isolate)
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of the first configuration here")
    p.add_argument("--compile_cache", default=None,
                   help="persistent XLA compilation cache dir (frame-wise 21 frames = 21 cache layouts to compile)")
    a = p.parse_args(argv)
    a.models = a.models.split(",")
    a.latent_hw = [int(v) for v in a.latent_hw.split(",")]
    a.blocks = [int(v) for v in a.blocks.split(",")]
    a.steps = [int(v) for v in a.steps.split(",")]
    a.contexts = a.contexts.split(",")
    a._profiled = False
    if a.quick:
        a.blocks, a.steps, a.repeats = [3, 1], [1, 2], min(a.repeats, 2)
    return a


def main(argv=None):
    args = parse(argv)
    configs = [(s, b, n, m) for s in model_setups(args) for b in args.blocks for n in args.steps
               for m in args.contexts]
    if args.only:
        configs = [c for c in configs if f"{c[0][0]}:{c[1]}:{c[2]}:{c[3]}" == args.only]
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    rows, model_cache = [], {}
    print(f"device: {jax.devices()[0]}", flush=True)

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), jax=jax.__version__, rows=rows, table=fmt(rows)), f,
                      indent=1)

    for (name, cfg, hw, frames, acts), block, steps, mode in configs:
        if args.isolate and not args.only:
            tmp = f"{args.out}.{name}_{block}_{steps}_{mode}.json"
            # argparse keeps the last --out, so the subprocess writes to tmp
            cmd = [sys.executable, os.path.abspath(__file__), *(a for a in (argv or sys.argv[1:]) if a != "--isolate"),
                   "--out", tmp, "--only", f"{name}:{block}:{steps}:{mode}"]
            subprocess.run(cmd, check=True)
            with open(tmp) as f:
                rows += json.load(f)["rows"]
            os.remove(tmp)
        else:
            rows.append(bench_one(name, cfg, hw, frames, acts, block, steps, mode, args, model_cache))
        print(fmt(rows[-1:]).splitlines()[-1], flush=True)
        save()                                              # partial results survive a time limit
    print("\n" + fmt(rows))
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
