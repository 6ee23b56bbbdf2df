"""When is a jitted call's output ready, if more work was dispatched after it (issue 7)?

The streaming sampler hands a chunk to the caller and may already have queued the clean-context
re-run behind it (`StreamingSampler(clean_rerun="separate")`). Whether the caller then sees the
chunk when its own kernels finish, or only when the queued re-run has finished too, depends on
how the runtime signals an output's readiness and on whether dispatch blocks. This measures it
with two jitted functions, f then g, each ~`--ms` of GPU work, in the two shapes the sampler
has: few long kernels (matrix products) and many short kernels (a loop of ~1,700 elementwise
kernels, as one model call of wan_1_3b launches):

  alone       f; wait for f's output
  queued      f, then g on f's output with f's second output donated (the re-run's shape);
              wait for f's first output, then for g's
For each: host time for the dispatch calls to return, time until f's output is ready, until g's
(medians of --repeats after a warm-up, `block_until_ready`).

    PYTHONPATH=. python3 experiments/dispatch_order_check.py --out $OUT/dispatch_order.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp


def long_kernels(n):
    def f(x, c):
        y = jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ x) * 0.5, x)
        return y, c + 1.0
    return f


def short_kernels(n):
    def f(x, c):
        y = jax.lax.fori_loop(0, n, lambda i, y: jnp.sin(y) * 1.0001 + 1e-3, x)
        return y, c + 1.0
    return f


def measure(fn, x, c, repeats):
    f = jax.jit(fn, donate_argnums=(1,))
    g = jax.jit(fn, donate_argnums=(1,))
    rows = {"alone": [], "queued": []}
    for r in range(repeats + 1):
        jax.block_until_ready((x, c))
        t0 = time.perf_counter()
        y, c = f(x, c)
        t_disp = time.perf_counter()
        y.block_until_ready()
        t_f = time.perf_counter()
        c.block_until_ready()
        if r:
            rows["alone"].append(dict(dispatch_ms=(t_disp - t0) * 1e3, f_ready_ms=(t_f - t0) * 1e3))
        jax.block_until_ready((x, c))
        t0 = time.perf_counter()
        y, c1 = f(x, c)
        z, c = g(y, c1)                 # f's output read, its second output donated
        t_disp = time.perf_counter()
        y.block_until_ready()
        t_f = time.perf_counter()
        z.block_until_ready()
        t_g = time.perf_counter()
        if r:
            rows["queued"].append(dict(dispatch_ms=(t_disp - t0) * 1e3, f_ready_ms=(t_f - t0) * 1e3,
                                       g_ready_ms=(t_g - t0) * 1e3))
    return {k: {m: statistics.median(row[m] for row in v) for m in v[0]} for k, v in rows.items()}, c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=8192, help="matrix size of the long kernels")
    p.add_argument("--long", type=int, default=30, help="matrix products per call")
    p.add_argument("--short", type=int, default=1700, help="elementwise kernels per call")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    k = jax.random.key(0)
    c = jnp.zeros((1024, 1024), jnp.float32)
    x_long = jax.random.normal(k, (a.size, a.size), jnp.bfloat16) / a.size ** 0.5
    x_short = jax.random.normal(k, (4 * 1024 * 1024,), jnp.float32)
    out = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, args=vars(a))
    for name, fn, x in (("long", long_kernels(a.long), x_long), ("short", short_kernels(a.short), x_short)):
        res, c = measure(fn, x, c, a.repeats)
        out[name] = res
        for case, m in res.items():
            print(f"{name:5s} {case:6s} " + "  ".join(f"{key} {v:8.2f}" for key, v in m.items()), flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
