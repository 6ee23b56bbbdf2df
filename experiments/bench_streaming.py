"""Streaming benchmark: time to first chunk, steady-state latent frames/s, peak memory.

    python experiments/bench_streaming.py --out results/bench_streaming.json        # GPU
    python experiments/bench_streaming.py --quick --out /tmp/bench_quick.json       # CPU smoke test
    python experiments/bench_streaming.py --save_videos DIR     # the videos of every configuration
    python experiments/bench_streaming.py --check_videos DIR    # the same videos again? (max |diff| <= 1e-6)

Default (GPU): `wan_1_3b` dimensions, random weights, bf16, 480p (latent 60x104 ->
30x52 = 1560 tokens/frame), 21 latent frames, B = 1, chunk 3 and frame-wise, 1/2/4
steps, clean- vs noisy-context, DiT only (no VAE, no text encoder); then the same
table for the tiny toy-world model (12-channel 16x16 latents, 21 frames, with actions).
Attention uses the config's `attn_impl` ("auto": the Pallas kernels where available) and, over the
KV cache, `--cache_attn_impl` ("auto": our Mosaic-GPU kernel on Hopper, cuDNN on other GPUs).

Per configuration: one warm-up video (compiles every cache layout), then `--repeats`
timed pairs of videos, each chunk `block_until_ready`-ed as it is yielded:
  first_chunk_ms: stream() call -> first chunk ready (latency a viewer sees)
  steady_fps:     latent frames after the first chunk / time from first to last chunk
                  ready, chunks dispatched one at a time (host gaps between chunks included)
  overall_fps:    all frames / total time, same run
  *_prefetch:     the same with prefetch (chunk i+1 dispatched before chunk i is handed
                  over, hiding host work; on CPU dispatch is not asynchronous, ignore these).
                  The streaming rate of `stream()`'s default (prefetch unless actions are
                  live).
  dispatch_ms:    median host time to hand over the next chunk (noise, layout, jit dispatch),
                  without prefetch: a few ms when dispatch is asynchronous, about the chunk's
                  device time when it is not
(medians over repeats). peak_mem_gb is the device's `peak_bytes_in_use` after the
configuration; it is a process-wide high-water mark, so use --isolate (one subprocess
per configuration) for per-configuration peaks.

Variants (model and compiler options; one per run, named by --label):
  --cross_attn_impl auto|mgpu|...  the cross-attention's backend (WanConfig.cross_attn_impl; auto:
                               the model's attn_impl, cuDNN on a GPU)
  --cache_attn_impl auto|mgpu|cudnn  the attention over the KV cache (auto: mgpu on Hopper)
  --compiler_option NAME=VALUE XLA option of the chunk function (repeatable), e.g. command
                               buffers (CUDA graphs) around while loops:
                               xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL
  --configs 2:noisy,2:clean    steps:context pairs instead of --steps x --contexts
  --compare A.json B.json ...  print the variants side by side and `best: LABEL` (no run)

Compile time: where the cache attention backend takes a traced length (mgpu, cuDNN, XLA), one
chunk function per chunk shape and step count; otherwise (Triton, Mosaic) the model takes
`cache_frames` as a static int and every cache length is its own executable -- chunk 3 over 21
frames compiles 7 chunk functions, frame-wise 21. If that does not fit one run, split it (`--blocks 3`, then
`--blocks 1`) and pass `--compile_cache DIR` so reruns reuse them. --profile DIR writes a
jax.profiler trace of one extra pair of videos of the first configuration (view in
TensorBoard/Perfetto; not part of the timings) and prints where the kernel time of a chunk goes
(experiments/trace_summary.py), including the idle gaps between kernels and whether the host
launched each kernel in time (the trace links kernels to their launch calls; XLA's CUDA graphs
stay on under the profiler: the trace shows cuGraphLaunch calls).
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

from crm_jax.models.config import get_model_config
from crm_jax.models.wan import AttentionPattern, functional, init_model
from crm_jax.sampling import StreamingSampler
from crm_jax.sampling.plan import chunk_bounds
from experiments import trace_summary

# A reduced wan_1_3b for CPU runs (--quick --models wan_small): 16 latent channels, the (1, 2, 2)
# patch, two layers of two heads.
WAN_SMALL = get_model_config("wan_1_3b", dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, text_len=16)

# Self Forcing (PyTorch, torch SDPA) on one H200, 2026-11-21, chunk 3: latent frames/s x 1.6.
TARGETS = {(3, 4, "clean"): 11.5, (3, 2, "clean"): 19.0, (3, 2, "noisy"): 27.0}


def model_setups(args):
    """[(name, cfg, latent_hw, frames, with_actions)] to benchmark."""
    if args.quick:
        setups = []
        if "tiny" in args.models or "wan_small" not in args.models:
            cfg = get_model_config("tiny", in_channels=12, out_channels=12, num_actions=5)
            setups.append(("tiny", cfg, (8, 8), 6, True))
        if "wan_small" in args.models:
            setups.append(("wan_small", WAN_SMALL, (8, 8), 6, False))
        return setups
    setups = []
    if "wan_1_3b" in args.models:
        cfg = get_model_config(
            "wan_1_3b",
            dtype=args.dtype,
            param_dtype=args.dtype,
            cache_attn_impl=args.cache_attn_impl,
            cross_attn_impl=args.cross_attn_impl,
        )
        setups.append(("wan_1_3b", cfg, tuple(args.latent_hw), args.frames, False))
    if "tiny" in args.models:
        cfg = get_model_config(
            "tiny",
            in_channels=12,
            out_channels=12,
            num_actions=5,
            dtype=args.dtype,
            param_dtype=args.dtype,
            cache_attn_impl=args.cache_attn_impl,
        )
        setups.append(("tiny", cfg, (16, 16), args.frames, True))
    return setups


def peak_memory_gb():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def time_video(sampler, key, context, frames, actions, prefetch):
    """(first_chunk_s, steady_fps, overall_fps, median host dispatch s of chunks >= 1) of one video.

    The dispatch time is how long the generator takes to hand over the next chunk (host work:
    noise, layout, jit dispatch; the device runs asynchronously), measured without prefetch.
    """
    t0 = time.perf_counter()
    ready, counts, dispatch = [], [], []
    it = iter(sampler.stream(key, context, frames, actions, prefetch=prefetch))
    while True:
        t_ask = time.perf_counter()
        c = next(it, None)
        if c is None:
            break
        dispatch.append(time.perf_counter() - t_ask)
        c.frames.block_until_ready()
        ready.append(time.perf_counter() - t0)
        counts.append(c.frames.shape[1])
    steady = (sum(counts[1:]) / (ready[-1] - ready[0])) if len(ready) > 1 else float("nan")
    disp = statistics.median(dispatch[1:]) if len(dispatch) > 1 else float("nan")
    return ready[0], steady, frames / ready[-1], disp


def timed(sampler, key, context, frames, actions):
    """One video without prefetch (latency, steady state incl. host gaps) and one with (pipelined)."""
    first, steady, overall, disp = time_video(sampler, key, context, frames, actions, False)
    _, steady_pf, overall_pf, _ = time_video(sampler, key, context, frames, actions, True)
    return first, steady, overall, steady_pf, overall_pf, disp


def bench_one(name, cfg, latent_hw, frames, with_actions, block, steps, mode, args, model_cache):
    if name not in model_cache:
        t = time.perf_counter()
        model_cache.clear()  # one model on the device at a time
        apply, params = functional(init_model(cfg, seed=0))
        jax.block_until_ready(params)
        model_cache[name] = (apply, params, time.perf_counter() - t)
    apply, params, _ = model_cache[name]
    pattern = AttentionPattern("block_causal", block)
    sampler = StreamingSampler(apply, params, cfg, pattern, latent_hw, 1, steps, mode, **variant_options(args))
    key = jax.random.key(0)
    context = jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim), jnp.float32)
    actions = np.random.default_rng(0).integers(0, cfg.num_actions, (1, frames)) if with_actions else None
    t = time.perf_counter()
    video = sampler.generate(key, context, frames, actions).block_until_ready()
    warmup = time.perf_counter() - t
    check = video_check(video)
    del video
    runs = [timed(sampler, key, context, frames, actions) for _ in range(args.repeats)]
    prof = None
    if args.profile and not args._profiled:
        # one more pair of videos under the profiler, not in the timings
        args._profiled = True
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            timed(sampler, key, context, frames, actions)
        chunks = len(list(chunk_bounds(pattern, frames)))
        try:  # two videos were traced (with and without prefetch): time per chunk
            prof = trace_summary.summarize(args.profile, per=2 * chunks, top=40)
            print(
                f"profile ({name}, chunk {block}, {steps} steps, {mode}), per chunk:\n" + trace_summary.fmt(prof),
                flush=True,
            )
        except (ValueError, FileNotFoundError) as e:
            print(f"profile summary failed: {e}", flush=True)
    first, steady, overall, steady_pf, overall_pf, disp = (statistics.median(x) for x in zip(*runs))
    tpf = sampler.tpf
    row = dict(
        model=name,
        variant=args.label,
        **variant_options(args),
        **model_options(args),
        traced_cache_len=sampler.traced_cache_len,
        latent_hw=list(latent_hw),
        tokens_per_frame=tpf,
        frames=frames,
        block_frames=block,
        steps=steps,
        context=mode,
        first_chunk_ms=first * 1e3,
        steady_fps=steady,
        overall_fps=overall,
        steady_fps_prefetch=steady_pf,
        overall_fps_prefetch=overall_pf,
        dispatch_ms=disp * 1e3,
        compiled=sampler.compiled_count(),
        video_check=check,
        warmup_s=warmup,
        peak_mem_gb=peak_memory_gb(),
        repeats=args.repeats,
        cache_gb=cfg.num_layers * frames * tpf * cfg.dim * 2 * jnp.dtype(cfg.compute_dtype).itemsize / 2**30,
    )
    if prof is not None:
        row["profile_per_chunk"] = prof
    target = TARGETS.get((block, steps, mode)) if name == "wan_1_3b" else None
    if target is not None:
        row.update(target_fps=target, meets_target=bool(steady >= target))
    return row


def video_name(name, block, steps, mode) -> str:
    return f"{name}_chunk{block}_{steps}steps_{mode}.npy"


def videos(args) -> int:
    """--save_videos / --check_videos: one video per configuration with the sampler's default options.

    Saves each video as DIR/<model>_chunk<B>_<S>steps_<context>.npy, or compares it with the file of
    that name in DIR (max |difference| per configuration). Returns the number of configurations
    that are missing or differ by more than `args.video_tol`.
    """
    configs = [(s, b, n, m) for s in model_setups(args) for b in args.blocks for n, m in args.pairs]
    target = args.save_videos or args.check_videos
    os.makedirs(target, exist_ok=True)
    bad, models = 0, {}
    for (name, cfg, hw, frames, with_actions), block, steps, mode in configs:
        if name not in models:
            models.clear()
            models[name] = functional(init_model(cfg, seed=0))
        apply, params = models[name]
        sampler = StreamingSampler(apply, params, cfg, AttentionPattern("block_causal", block), hw, 1, steps, mode)
        context = jax.random.normal(jax.random.key(1), (1, cfg.text_len, cfg.text_dim), jnp.float32)
        actions = np.random.default_rng(0).integers(0, cfg.num_actions, (1, frames)) if with_actions else None
        video = np.asarray(sampler.generate(jax.random.key(0), context, frames, actions), np.float32)
        path = os.path.join(target, video_name(name, block, steps, mode))
        label = f"{name} chunk {block} {steps} steps {mode}"
        if args.save_videos:
            np.save(path, video)
            print(f"{label}: saved {path} {video.shape}", flush=True)
            continue
        if not os.path.exists(path):
            print(f"{label}: MISSING {path}", flush=True)
            bad += 1
            continue
        ref = np.load(path)
        diff = float(np.max(np.abs(video - ref))) if ref.shape == video.shape else float("inf")
        ok = diff <= args.video_tol
        bad += not ok
        print(f"{label}: max |diff| {diff:.3e}{'' if ok else '  FAIL'}", flush=True)
    return bad


def fmt(rows):
    head = (
        f"{'variant':14s} {'model':9s} {'chunk':>5s} {'steps':>5s} {'context':>7s} {'first ms':>9s} "
        f"{'steady f/s':>10s} {'prefetch':>8s} {'disp ms':>7s} {'peak GB':>8s} {'target':>9s}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        tgt = "" if "target_fps" not in r else f"{r['target_fps']:.1f}{' ok' if r['meets_target'] else ' MISS'}"
        lines.append(
            f"{r.get('variant', '-')[:14]:14s} {r['model']:9s} {r['block_frames']:5d} {r['steps']:5d} "
            f"{r['context']:>7s} {r['first_chunk_ms']:9.1f} {r['steady_fps']:10.2f} "
            f"{r['steady_fps_prefetch']:8.2f} {r.get('dispatch_ms', float('nan')):7.2f} {peak:>8s} {tgt:>9s}"
        )
    return "\n".join(lines)


def video_check(video) -> dict:
    """A fingerprint of a generated video (same seeds in every variant): mean |x| and 64 samples."""
    flat = np.asarray(video, np.float32).reshape(-1)
    idx = np.linspace(0, flat.size - 1, 64).astype(np.int64)
    return dict(
        abs_mean=float(np.abs(flat).mean()), finite=bool(np.isfinite(flat).all()), samples=[float(x) for x in flat[idx]]
    )


def variant_options(args) -> dict:
    """The StreamingSampler options of the benchmarked variant."""
    return dict(compiler_options=dict(args.compiler_option) or None)


def model_options(args) -> dict:
    """The model-config options of the benchmarked variant (recorded next to the sampler's)."""
    return dict(cache_attn_impl=args.cache_attn_impl, cross_attn_impl=args.cross_attn_impl)


def compare(paths, key=("wan_1_3b", 3, 2, "noisy")) -> str:
    """A table of several result files (one variant each) and the best variant at `key`.

    Rows: (chunk, steps, context); columns: steady f/s per variant (missing: '-'). The last
    line is `best: LABEL` -- the variant with the highest steady f/s at `key`
    (model, chunk, steps, context) -- or `best: none`.
    """
    runs = []
    for p in paths:
        try:
            with open(p) as f:
                rows = json.load(f)["rows"]
        except (OSError, ValueError, KeyError) as e:
            print(f"skipping {p}: {e}", flush=True)
            continue
        if rows:
            runs.append((rows[0].get("variant") or os.path.basename(p), rows))
    cells = {}
    for label, rows in runs:
        for r in rows:
            cells[(r["model"], r["block_frames"], r["steps"], r["context"]), label] = r
    keys = sorted({k for k, _ in cells}, key=lambda k: (k[0], k[1], k[2], k[3] != "noisy"))
    labels = [label for label, _ in runs]
    width = 16
    head = f"{'model':9s} {'chunk':>5s} {'steps':>5s} {'context':>7s} {'target':>6s}  " + " ".join(
        f"{lab[:width]:>{width}s}" for lab in labels
    )
    lines = ["per variant: steady latent frames/s / host dispatch ms per chunk", head, "-" * len(head)]
    for k in keys:
        tgt = TARGETS.get(k[1:]) if k[0] == "wan_1_3b" else None
        vals = []
        for lab in labels:
            r = cells.get((k, lab))
            vals.append(
                f"{'-':>{width}s}"
                if r is None
                else f"{r['steady_fps']:.2f} / {r.get('dispatch_ms', float('nan')):.1f}".rjust(width)
            )
        lines.append(
            f"{k[0]:9s} {k[1]:5d} {k[2]:5d} {k[3]:>7s} {'' if tgt is None else f'{tgt:.1f}':>6s}  " + " ".join(vals)
        )
    if labels:  # same seeds everywhere: the videos must agree up to kernel rounding
        ref_label = labels[0]
        lines.append(
            f"video deviation from {ref_label} (max |sample difference| / mean |x|; bf16 "
            "rounding gives ~1e-2, a wrong path O(1)):"
        )
        for k in keys:
            ref = cells.get((k, ref_label), {}).get("video_check")
            devs = []
            for lab in labels[1:]:
                other = cells.get((k, lab), {}).get("video_check")
                if ref is None or other is None:
                    continue
                d = np.max(np.abs(np.subtract(other["samples"], ref["samples"]))) / max(ref["abs_mean"], 1e-30)
                devs.append(f"{lab}: {d:.1e}{'' if other['finite'] else ' NON-FINITE'}")
            if devs:
                lines.append(f"  {k[0]} chunk {k[1]} {k[2]} steps {k[3]}: " + ", ".join(devs))
    scored = [(cells[(key, lab)]["steady_fps"], lab) for lab in labels if (key, lab) in cells]
    lines.append(f"best: {max(scored)[1] if scored else 'none'}")
    return "\n".join(lines)


def _option(text: str):
    """NAME=VALUE of --compiler_option (true/false/ints become bool/int, as jax.jit expects)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--compiler_option takes NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    low = value.lower()
    if low in ("true", "false"):
        return name, low == "true"
    try:
        return name, int(value)
    except ValueError:
        return name, value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON output path (required unless --compare or a video mode)")
    p.add_argument(
        "--save_videos",
        default=None,
        metavar="DIR",
        help="no timing: generate one video per configuration with the default sampler and save it in DIR",
    )
    p.add_argument(
        "--check_videos",
        default=None,
        metavar="DIR",
        help="no timing: generate the videos as --save_videos does and compare them with those in DIR "
        "(fails if any differs by more than --video_tol)",
    )
    p.add_argument("--video_tol", type=float, default=1e-6, help="largest max |difference| --check_videos accepts")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny model, small sizes (CPU sanity check); default --blocks 3,1 --steps 1,2 --repeats 2",
    )
    p.add_argument("--models", default="wan_1_3b,tiny")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--latent_hw", default="60,104")
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--blocks", default=None, help="chunk sizes in latent frames (1 = frame-wise); default 3,1")
    p.add_argument("--steps", default=None, help="default 1,2,4")
    p.add_argument("--contexts", default="clean,noisy")
    p.add_argument(
        "--configs",
        default=None,
        help="steps:context pairs to run instead of --steps x --contexts, e.g. 2:noisy,2:clean,4:clean",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (default 5)")
    p.add_argument("--label", default=None, help="variant name in the table and JSON (default: from the options)")
    p.add_argument(
        "--cache_attn_impl",
        default="auto",
        choices=["auto", "mgpu", "cudnn", "xla", "triton"],
        help="backend of the attention over the KV cache (WanConfig.cache_attn_impl; auto: our "
        "Mosaic-GPU kernel on Hopper, cuDNN on other GPUs)",
    )
    p.add_argument(
        "--cross_attn_impl",
        default="auto",
        choices=["auto", "mgpu", "cudnn", "xla"],
        help="backend of the cross-attention (WanConfig.cross_attn_impl; auto: the model's attn_impl)",
    )
    p.add_argument(
        "--compiler_option",
        type=_option,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="XLA option of the jitted chunk function (repeatable), e.g. "
        "xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
        "DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL",
    )
    p.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print a table of these result files (one variant each) and the best variant; no run",
    )
    p.add_argument(
        "--compare_key",
        default="wan_1_3b:3:2:noisy",
        metavar="MODEL:CHUNK:STEPS:CONTEXT",
        help="the configuration --compare ranks the variants by",
    )
    p.add_argument("--isolate", action="store_true", help="one subprocess per configuration (exact peaks)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # model:block:steps:context (--isolate)
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of the first configuration here")
    p.add_argument(
        "--compile_cache",
        default=None,
        help="persistent XLA compilation cache dir (frame-wise 21 frames = 21 cache layouts to compile)",
    )
    a = p.parse_args(argv)
    if a.compare:
        return a
    if a.save_videos and a.check_videos:
        p.error("--save_videos and --check_videos exclude each other")
    if a.out is None and not (a.save_videos or a.check_videos):
        p.error("--out is required (unless --compare, --save_videos or --check_videos)")
    a.models = a.models.split(",")
    a.latent_hw = [int(v) for v in a.latent_hw.split(",")]
    a.blocks = [int(v) for v in (a.blocks or "3,1").split(",")]
    a.steps = [int(v) for v in (a.steps or ("1,2" if a.quick else "1,2,4")).split(",")]
    a.repeats = (2 if a.quick else 5) if a.repeats is None else a.repeats
    a.contexts = a.contexts.split(",")
    pairs = (
        [(n, m) for n in a.steps for m in a.contexts] if a.configs is None else [_pair(c) for c in a.configs.split(",")]
    )
    a.pairs = pairs
    if a.label is None:
        a.label = "-".join(
            ["default"]
            + ([a.cache_attn_impl] if a.cache_attn_impl != "auto" else [])
            + ([f"cross_{a.cross_attn_impl}"] if a.cross_attn_impl != "auto" else [])
            + (["opts"] if a.compiler_option else [])
        )
    a._profiled = False
    return a


def _pair(text: str) -> tuple[int, str]:
    steps, _, mode = text.partition(":")
    if mode not in ("clean", "noisy") or not steps.isdigit() or int(steps) < 1:
        raise SystemExit(f"--configs entries are STEPS:CONTEXT with CONTEXT clean|noisy, got {text!r}")
    return int(steps), mode


def main(argv=None):
    args = parse(argv)
    if args.compare:
        model, chunk, steps, mode = args.compare_key.split(":")
        print(compare(args.compare, (model, int(chunk), int(steps), mode)))
        return
    if args.save_videos or args.check_videos:
        bad = videos(args)
        if bad:
            raise SystemExit(f"{bad} video(s) missing or differing by more than {args.video_tol}")
        return
    configs = [(s, b, n, m) for s in model_setups(args) for b in args.blocks for n, m in args.pairs]
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
            json.dump(
                dict(
                    device=str(jax.devices()[0]),
                    device_kind=jax.devices()[0].device_kind,
                    jax=jax.__version__,
                    variant=args.label,
                    xla_flags=os.environ.get("XLA_FLAGS", ""),
                    options={**variant_options(args), **model_options(args)},
                    rows=rows,
                    table=fmt(rows),
                ),
                f,
                indent=1,
            )

    for (name, cfg, hw, frames, acts), block, steps, mode in configs:
        if args.isolate and not args.only:
            tmp = f"{args.out}.{name}_{block}_{steps}_{mode}.json"
            # argparse keeps the last --out, so the subprocess writes to tmp
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *(a for a in (argv or sys.argv[1:]) if a != "--isolate"),
                "--out",
                tmp,
                "--only",
                f"{name}:{block}:{steps}:{mode}",
            ]
            subprocess.run(cmd, check=True)
            with open(tmp) as f:
                rows += json.load(f)["rows"]
            os.remove(tmp)
        else:
            rows.append(bench_one(name, cfg, hw, frames, acts, block, steps, mode, args, model_cache))
        print(fmt(rows[-1:]).splitlines()[-1], flush=True)
        save()  # partial results survive a time limit
    print("\n" + fmt(rows))
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
