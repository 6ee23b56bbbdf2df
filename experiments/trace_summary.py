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

`gaps` splits the idle time by the length of each gap between consecutive kernels:
`within_ms` (gaps < 1 ms: launch gaps inside a step) and `between_ms` (>= 1 ms: host work
between steps, or between the profiled runs), a histogram of the short gaps, the kernels that
wait longest in total after the previous one (`top_waiting`), and, where the trace links each
kernel to its host launch call (a `correlation id`), `host_late_ms`: the part of the short gaps
in which the host had not yet returned from launching the next kernel (host-bound), against
`device_ms` (the launch was queued in time: the device's own gap between dependent kernels).
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
    (
        "collective",
        (
            "nccl",
            "all-to-all",
            "all_to_all",
            "allgather",
            "all-gather",
            "reduce-scatter",
            "reduce_scatter",
            "all-reduce",
            "allreduce",
        ),
    ),
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
    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
        + glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
        key=os.path.getmtime,
    )
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
    kernels = [
        e
        for e in events
        if e.get("ph") == "X"
        and "dur" in e
        and "stream" in tname.get((e["pid"], e.get("tid")), "").lower()
        and any(k in pname.get(e["pid"], "").lower() for k in ("gpu", "device", "tpu"))
    ]
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
    launches = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e and any(c in e.get("name", "").lower() for c in LAUNCH_CALLS):
            cid = _correlation(e)
            if cid is not None:
                launches[cid] = e["ts"] + e["dur"]
    return dict(
        trace=path,
        per=per,
        busy_ms=ms(busy),
        span_ms=ms(span),
        idle_ms=ms(span - union),
        kernels=round(len(kernels) / per, 1),
        categories={c: dict(ms=ms(v), share=round(v / busy, 3)) for c, v in by_cat.most_common()},
        top_kernels=[
            dict(name=n[:120], category=category(n), ms=ms(v), calls=round(calls[n] / per, 1))
            for n, v in by_name.most_common(top)
        ],
        gaps=gap_stats(kernels, launches, per),
    )


GAP_BINS = ((2, "<2us"), (5, "2-5us"), (10, "5-10us"), (50, "10-50us"), (1000, "50us-1ms"))
LAUNCH_CALLS = ("culaunch", "cudalaunch", "cugraphlaunch", "cudagraphlaunch")


def _correlation(e):
    for k, v in (e.get("args") or {}).items():
        if "correlation" in k.lower():
            try:
                return int(v)
            except (TypeError, ValueError):
                return None
    return None


def gap_stats(kernels: list, launches: dict, per: float = 1.0, top: int = 10) -> dict:
    """Idle gaps between consecutive kernels (see the module docstring).

    kernels: trace events with ts, dur (us), name; launches: correlation id -> host launch call
    end time (us). Returns a dict of ms per unit (`per`).
    """
    ms = lambda us: round(us / 1e3 / per, 3)
    ks = sorted(kernels, key=lambda e: e["ts"])
    end = ks[0]["ts"] + ks[0]["dur"]
    within = between = host_late = 0.0
    hist = {label: [0, 0.0] for _, label in GAP_BINS}
    waiting, waits = collections.Counter(), collections.Counter()
    matched = short = 0
    for e in ks[1:]:
        gap = e["ts"] - end
        if gap > 0 and gap < 1000:
            within += gap
            short += 1
            label = next(lab for lim, lab in GAP_BINS if gap < lim)
            hist[label][0] += 1
            hist[label][1] += gap
            waiting[e["name"]] += gap
            waits[e["name"]] += 1
            launched = launches.get(_correlation(e))
            if launched is not None:
                matched += 1
                host_late += min(gap, max(0.0, launched - end))
        elif gap >= 1000:
            between += gap
        end = max(end, e["ts"] + e["dur"])
    out = dict(
        within_ms=ms(within),
        between_ms=ms(between),
        short_gaps=round(short / per, 1),
        hist={k: dict(gaps=round(n / per, 1), ms=ms(v)) for k, (n, v) in hist.items()},
        top_waiting=[dict(name=n[:120], ms=ms(v), gaps=round(waits[n] / per, 1)) for n, v in waiting.most_common(top)],
    )
    if matched:
        out.update(
            host_late_ms=ms(host_late),
            device_ms=ms(within - host_late),
            launch_matched=round(matched / max(short, 1), 3),
        )
    return out


def fmt(s: dict) -> str:
    lines = [
        f"kernel time per unit (/{s['per']:g}): busy {s['busy_ms']:.2f} ms, span {s['span_ms']:.2f} ms, "
        f"idle {s['idle_ms']:.2f} ms, {s.get('kernels', float('nan')):g} kernels",
        f"{'category':12s} {'ms':>10s} {'share':>7s}",
    ]
    lines += [f"{c:12s} {v['ms']:10.2f} {v['share']:7.1%}" for c, v in s["categories"].items()]
    lines.append("top kernels:")
    lines += [
        f"  {k['ms']:9.2f} ms  {k.get('calls', float('nan')):7g} x  {k['category']:10s} {k['name']}"
        for k in s["top_kernels"]
    ]
    g = s.get("gaps")
    if g:
        host = (
            f", host late {g['host_late_ms']:.2f} ms / device {g['device_ms']:.2f} ms "
            f"({g['launch_matched']:.0%} of gaps linked to their launch)"
            if "host_late_ms" in g
            else ""
        )
        lines.append(
            f"idle: {g['within_ms']:.2f} ms in {g['short_gaps']:g} gaps < 1 ms{host}; "
            f"{g['between_ms']:.2f} ms in gaps >= 1 ms"
        )
        lines.append(
            "  short gaps: " + ", ".join(f"{k} {v['gaps']:g} x {v['ms']:.2f} ms" for k, v in g["hist"].items())
        )
        lines.append("  longest total wait before:")
        lines += [f"    {w['ms']:8.2f} ms  {w['gaps']:7g} x  {w['name']}" for w in g["top_waiting"]]
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
