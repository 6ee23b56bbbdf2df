"""Where the GPU time goes: sum the kernels of a `jax.profiler` trace by category.

    python experiments/trace_summary.py TRACE_DIR [--per N] [--top 15] [--out FILE.json]

TRACE_DIR is what `jax.profiler.trace(TRACE_DIR, create_perfetto_trace=True)` wrote
(the newest `plugins/profile/*/perfetto_trace.json.gz` under it is read). Only
events on the device's stream lines ("Stream #...") are counted, so the XLA op /
module summary lines, which overlap the kernels, are not counted twice. Kernel
time is split into:

  attention   our Pallas kernels (crm_flash_*), cuDNN / flash attention kernels
  matmul      cuBLAS / cuBLASLt / CUTLASS / XLA Triton GEMM fusions
  collective  NCCL (all-to-all, all-gather, reduce-scatter, all-reduce)
  copy        memcpy / memset / copy and dynamic-update-slice kernels (cache writes)
  other       every other XLA fusion: norms, RoPE, modulation, softmax-free
              elementwise work, reductions, the optimizer

`busy_ms` is the sum of kernel time (streams can overlap, so it can exceed the
wall time), `span_ms` the first-kernel-start to last-kernel-end interval, and
`idle_ms = span - union of kernel intervals` the time no kernel ran (host work,
launch gaps), `kernels` the number of kernels and each top kernel's `calls`. `--per N`
divides by N (e.g. the number of profiled steps).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

CATEGORIES = [
    ("attention", ("crm_flash", "fmha", "flash", "cudnn", "attention")),
    ("collective", ("nccl", "all-to-all", "all_to_all", "allgather", "all-gather", "reduce-scatter",
                    "reduce_scatter", "all-reduce", "allreduce")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "dot", "matmul", "wgmma")),
    ("copy", ("memcpy", "memset", "copy", "dynamic-update-slice", "dynamic_update_slice")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def find_trace(trace_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
                   + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz / perfetto_trace.json.gz under {trace_dir}")
    return files[-1]


def summarize(trace_dir: str, per: float = 1.0, top: int = 15) -> dict:
    path = find_trace(trace_dir)
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pname, tname = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pname[e["pid"]] = e.get("args", {}).get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tname[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e
               and "stream" in tname.get((e["pid"], e.get("tid")), "").lower()
               and any(k in pname.get(e["pid"], "").lower() for k in ("gpu", "device", "tpu"))]
    if not kernels:
        lines = sorted({f"{pname.get(p, p)} / {t}" for (p, _), t in tname.items()})
        raise ValueError(f"no device stream events in {path}; lines present: {lines[:40]}")
    by_cat, by_name, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        by_cat[category(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
        calls[e["name"]] += 1
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    union, cur_s, cur_e = 0.0, *spans[0]
    for s, t in spans[1:]:
        if s > cur_e:
            union += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    union += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    ms = lambda us: round(us / 1e3 / per, 3)
    busy = sum(by_cat.values())
    return dict(trace=path, per=per, busy_ms=ms(busy), span_ms=ms(span), idle_ms=ms(span - union),
                kernels=round(len(kernels) / per, 1),
                categories={c: dict(ms=ms(v), share=round(v / busy, 3)) for c, v in by_cat.most_common()},
                top_kernels=[dict(name=n[:120], category=category(n), ms=ms(v), calls=round(calls[n] / per, 1))
                             for n, v in by_name.most_common(top)])


def fmt(s: dict) -> str:
    lines = [f"kernel time per unit (/{s['per']:g}): busy {s['busy_ms']:.2f} ms, span {s['span_ms']:.2f} ms, "
             f"idle {s['idle_ms']:.2f} ms, {s.get('kernels', float('nan')):g} kernels",
             f"{'category':12s} {'ms':>10s} {'share':>7s}"]
    lines += [f"{c:12s} {v['ms']:10.2f} {v['share']:7.1%}" for c, v in s["categories"].items()]
    lines.append("top kernels:")
    lines += [f"  {k['ms']:9.2f} ms  {k.get('calls', float('nan')):7g} x  {k['category']:10s} {k['name']}"
              for k in s["top_kernels"]]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--per", type=float, default=1.0)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    s = summarize(a.trace_dir, a.per, a.top)
    print(fmt(s))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(s, f, indent=1)


if __name__ == "__main__":
    main()
