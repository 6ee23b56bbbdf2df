"""What the attention-kernel tests share: seeded random inputs, the relative error, and the
float64 oracle (`pallas_kernels.reference.attention_reference`, the one reference of every kernel)."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import attention_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

_rng = np.random.default_rng(0)


def seed(name: str) -> None:
    """Restart the draws of `rand` from a seed fixed by `name` (the conftest passes each test's
    node id, so a test sees the same inputs whatever else runs)."""
    global _rng
    _rng = np.random.default_rng(zlib.crc32(name.encode()))


def rand(shape, dtype, scale: float = 1.0):
    """Standard-normal draws (times `scale`) of `shape` in `dtype`, from the seeded stream."""
    return jnp.asarray(scale * _rng.standard_normal(shape), dtype)


def f64(x) -> np.ndarray:
    """`x` (any float dtype, e.g. bfloat16) as a float64 numpy array, via float32 (exact)."""
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def rel(a, b) -> float:
    """Relative L2 error `|a - b| / |b|`; raises if `a` has a non-finite (unwritten) element."""
    a = f64(a)
    b = np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite (unwritten or NaN) elements in kernel output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def reference_fn(spec, **kw):
    """`f(q, k, v) -> o`: the reference attention of `spec` (keywords: `attention_reference`'s)."""
    return lambda q, k, v: attention_reference(q, k, v, spec, **kw)


def reference_all(spec, q, k, v, do, tq, tk, tv):
    """float64 O `[B, Lq, H, D]`, LSE `[B, H, Lq]`, (dQ, dK, dV) = vjp(dO), Ȯ = jvp((Q̇, K̇, V̇));
    zero tangents for None."""
    with jax.enable_x64(True):
        a = [jnp.asarray(f64(x)) for x in (q, k, v)]
        f = reference_fn(spec)
        o, lse = attention_reference(*a, spec, return_lse=True)
        _, vjp = jax.vjp(f, *a)
        grads = vjp(jnp.asarray(f64(do)))
        tans = tuple(jnp.zeros_like(x) if t is None else jnp.asarray(f64(t)) for t, x in zip((tq, tk, tv), a))
        _, to = jax.jvp(f, tuple(a), tans)
        return (np.asarray(o), np.asarray(lse), [np.asarray(g) for g in grads], np.asarray(to))


def prefix_reference(q, k, v, kv_len, scale=None) -> np.ndarray:
    """float64 attention `[B, Lq, H, D]` over keys `[0, kv_len)` (`kv_valid_len` of the reference)."""
    with jax.enable_x64(True):
        a = [jnp.asarray(f64(x)) for x in (q, k, v)]
        return np.asarray(attention_reference(*a, scale=scale, kv_valid_len=kv_len))
