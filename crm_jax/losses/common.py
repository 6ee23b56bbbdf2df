"""Shared helpers of the loss functions (validation, reductions, NaN masking, jvp)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from crm_jax import diffusion as D

Array = jax.Array
sg = jax.lax.stop_gradient


def check_x(x: Array, name: str = "x0", min_ndim: int = 1) -> Array:
    """``x`` must be a floating array ``[B, ...]`` with at least ``min_ndim`` axes."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} must be an array, got {type(x)}")
    x = jnp.asarray(x)
    if x.ndim < min_ndim:
        what = "[B, T, ...] (a frame axis is needed)" if min_ndim >= 2 else "[B, ...]"
        raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return x


def check_same_shape(a: Array | None, x: Array, name: str) -> None:
    if a is not None and tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(x.shape)}")


def check_conds(x: Array, cond: Any, uncond: Any = None, guidance=1.0) -> None:
    B = x.shape[0]
    D.check_cond(cond, B, "cond")
    D.check_cond(uncond, B, "uncond")
    if uncond is None and not D.guidance_is_one(guidance):
        raise ValueError("guidance != 1 needs an `uncond` (negative / unconditional) pytree")


def get_time(t: Array | None, x: Array, key: Array, sampler, dtype, *, lo=0.0, hi=1.0, name="t") -> Array:
    """Return the given times (checked) or per-sample times ``[B]`` drawn with ``sampler``."""
    if t is None:
        return sampler(key, (x.shape[0],), dtype=dtype)
    t = D.check_time_shape(t, x, name)
    D.check_time(t, lo=lo, hi=hi, name=name)
    return jnp.asarray(t, dtype)


def get_noise(noise: Array | None, x: Array, key: Array, dtype) -> Array:
    if noise is None:
        return jax.random.normal(key, x.shape, dtype)
    check_same_shape(noise, x, "noise")
    return jnp.asarray(noise, dtype)


def frame_times(t: Array, B: int, T: int) -> Array:
    """Per-sample ``[B]`` or per-frame ``[B, T]`` times -> per-frame ``[B, T]``."""
    return jnp.broadcast_to(t[:, None], (B, T)) if t.ndim == 1 else t


def sum_per_sample(x: Array) -> Array:
    """``sum over all non-batch axes``: ``[B, ...] -> [B]``."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def mean_per_sample(x: Array) -> Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def norm_per_sample(x: Array) -> Array:
    """L2 norm over all non-batch axes: ``[B, ...] -> [B]``."""
    return jnp.sqrt(sum_per_sample(jnp.square(x)))


def bad_samples(*xs: Array) -> Array:
    """Boolean ``[B]``: True where any of ``xs`` has a non-finite (NaN/inf) entry in that sample."""
    bad = None
    for x in xs:
        b = ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
        bad = b if bad is None else (bad | b)
    return bad


def mask_samples(bad: Array, x: Array) -> Array:
    """Zero the samples flagged in ``bad`` (``[B]``)."""
    return jnp.where(D.expand_time(bad, x), jnp.zeros_like(x), x)


def warmup_ratio(step, tangent_warmup) -> Array:
    """``r = min(1, step / tangent_warmup)``; ``r = 1`` when ``tangent_warmup <= 0``. Traceable."""
    step = jnp.asarray(step, jnp.float32)
    w = jnp.asarray(tangent_warmup, jnp.float32)
    return jnp.where(w > 0, jnp.minimum(1.0, step / jnp.maximum(w, 1e-12)), 1.0)


def jvp_time_derivative(f: Callable, x: Array, t: Array, cond: Any, dx_dt: Array, dt_dt=None) -> tuple[Array, Array]:
    """Total time derivative of ``f(x, t, cond)`` along a path: ``jax.jvp`` with tangents ``(dx_dt, dt_dt)``.

    ``dt_dt`` defaults to ones (``d/dt``); pass a scaled tangent (e.g. ``cos s sin s``) to get the
    scaled derivative. Only ``x`` and ``t`` carry tangents; ``cond`` is closed over (zero tangent).
    Returns ``(f(x, t), df)``.
    """
    t = jnp.asarray(t)
    if dt_dt is None:
        dt_dt = jnp.ones_like(t)
    return jax.jvp(lambda x_, t_: f(x_, t_, cond), (x, t), (jnp.asarray(dx_dt, x.dtype), jnp.asarray(dt_dt, t.dtype)))


def bell_weight(t: Array) -> Array:
    """Bell loss weight ``w(t) = exp(-2 (t - 1/2)^2) - exp(-1/2)`` (zero at t = 0 and 1, max 0.393 at 1/2)."""
    return jnp.exp(-2.0 * jnp.square(t - 0.5)) - jnp.exp(-0.5)


def scalar_metrics(**kw) -> dict:
    return {k: jnp.asarray(v) for k, v in kw.items()}
