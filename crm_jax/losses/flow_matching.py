"""Teacher flow matching: plain, teacher forcing (TF) and diffusion forcing (DF).

Target velocity ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``. Reduction (as in the reference
causal trainer): per time element (sample, or frame for per-frame times) the squared error is
averaged over the remaining (feature) axes, multiplied by ``w(t)`` and summed over frames; the
batch is averaged::

    L = loss_scale * mean_b  sum_f  w(t_bf) * mean_{h,w,c} (v_theta - (eps - x0))^2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from crm_jax import diffusion as D
from crm_jax.losses import common as C

Array = jax.Array

_WEIGHTINGS = ("none", "bell")


def _check_weighting(weighting: str) -> None:
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")


def _weight(weighting: str, t: Array) -> Array:
    if weighting == "none":
        return jnp.ones_like(t)
    if weighting == "bell":
        return C.bell_weight(t)
    raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")


def _weighted_frame_mse(err: Array, t: Array, weighting: str) -> Array:
    """``sum_f w(t_f) mean_feat err^2`` per sample; ``t`` is ``[B]`` or ``[B, T]``."""
    per_time = jnp.mean(jnp.square(err).reshape(tuple(t.shape) + (-1,)), axis=-1)  # t.shape
    w = _weight(weighting, t)
    return jnp.sum((w * per_time).reshape(t.shape[0], -1), axis=1)


def flow_matching_loss(
    fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    t: Array | None = None,
    noise: Array | None = None,
    sampler=None,
    weighting: str = "none",
    loss_scale: float = 1.0,
):
    """Plain RF flow matching ``loss_scale * mean_b sum_f w(t) mean (fn(x_t, t) - (eps - x0))^2``.

    Args:
      fn: velocity network ``fn(x, t, cond)`` (bidirectional, or block-causal with per-frame t).
      x0: data ``[B, ...]``.
      cond: conditioning pytree.
      key: PRNG key (times and noise).
      t: optional RF times ``[B]`` or ``[B, T]`` (default: ``sampler`` per sample).
      noise: optional ``eps`` shaped like ``x0``.
      sampler: ``sampler(key, shape, dtype)``; default UniformShift(5).
      weighting: ``"none"`` or ``"bell"`` (w(t) = exp(-2(t-1/2)^2) - e^{-1/2}).
    Returns:
      ``(loss, {"loss", "mse", "t_mean"})``.
    """
    x0 = C.check_x(x0)
    C.check_conds(x0, cond)
    _check_weighting(weighting)
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, x0, k_t, sampler or D.uniform_shift_sampler(5.0), dt)
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    x_t = D.rf_noise(x0, eps, t)
    v = D.call_net(fn, x_t, t, cond).astype(dt)
    err = v - (eps - x0)
    per = _weighted_frame_mse(err, t, weighting)
    loss = loss_scale * jnp.mean(per)
    return loss, C.scalar_metrics(loss=loss, mse=jnp.mean(jnp.square(err)), t_mean=jnp.mean(t))


def teacher_forcing_loss(
    fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    t: Array | None = None,
    noise: Array | None = None,
    sampler=None,
    weighting: str = "bell",
    loss_scale: float = 1.0,
):
    """Teacher-forcing (TF) flow matching of a causal teacher on packed ``[clean x0 | noisy x_t]``.

    One RF time per sample (default UniformShift(5); ``t`` may also be given ``[B]`` or ``[B, T]``),
    ``x_t = (1 - t) x0 + t eps``; the network sees ``x_packed = concat([x0, x_t], 1)`` with
    ``t_packed = concat([0, t], 1)`` (clean context at t = 0, per-frame times ``[B, 2T]``) and returns a
    packed velocity; only the noisy half ``out[:, T:]`` enters the loss::

        L = loss_scale * mean_b sum_f w(t_bf) mean_{hwc} (out[:, T:] - (eps - x0))^2,
        w(t) = exp(-2 (t - 1/2)^2) - exp(-1/2)   ("bell", default) or 1 ("none").

    Args:
      fn: packed causal network ``fn(x_packed [B, 2T, ...], t_packed [B, 2T], cond)``
        (teacher-forcing attention mask is the network's business).
      x0: clean video ``[B, T, H, W, C]`` (any ``[B, T, ...]``).
    Returns:
      ``(loss, {"loss", "mse", "t_mean"})``.
    """
    x0 = C.check_x(x0, min_ndim=2)
    C.check_conds(x0, cond)
    _check_weighting(weighting)
    dt = D.compute_dtype(x0)
    B, T = x0.shape[:2]
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, x0, k_t, sampler or D.uniform_shift_sampler(5.0), dt)
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    x_t = D.rf_noise(x0, eps, t)
    x_p, t_p = D.pack_teacher_forcing(x0, x_t, t)
    v = D.unpack_noisy(D.call_net(fn, x_p, t_p, cond), T).astype(dt)
    err = v - (eps - x0)
    tf = C.frame_times(t, B, T)
    per = _weighted_frame_mse(err, tf, weighting)
    loss = loss_scale * jnp.mean(per)
    return loss, C.scalar_metrics(loss=loss, mse=jnp.mean(jnp.square(err)), t_mean=jnp.mean(t))


def diffusion_forcing_loss(
    fn,
    x0: Array,
    cond: Any,
    key: Array,
    sizes: Sequence[int],
    *,
    t: Array | None = None,
    noise: Array | None = None,
    sampler=None,
    weighting: str = "none",
    loss_scale: float = 1.0,
):
    """Diffusion-forcing (DF) flow matching: an independent RF time per block of frames.

    ``t_blocks ~ sampler`` (default UniformShift(5)) of shape ``[B, num_blocks]`` broadcast to per-frame
    times ``[B, T]`` with ``sizes`` (frames per block, e.g. ``diffusion.block_sizes(T, chunk, first)``);
    ``x_t = (1 - t) x0 + t eps`` per frame; the block-causal network ``fn(x_t, t [B, T], cond)`` predicts
    ``eps - x0``::

        L = loss_scale * mean_b sum_f w(t_bf) mean_{hwc} (fn(x_t, t) - (eps - x0))^2   (w = 1 by default)

    Args:
      x0: ``[B, T, ...]``; ``sizes`` must sum to T.
      t: optional per-frame ``[B, T]`` times (overrides sampling).
    Returns:
      ``(loss, {"loss", "mse", "t_mean"})``.
    """
    x0 = C.check_x(x0, min_ndim=2)
    sizes = D.check_block_sizes(sizes, x0.shape[1])
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    if t is None:
        t = D.sample_block_times(k_t, x0.shape[0], sizes, sampler or D.uniform_shift_sampler(5.0), dtype=dt)
    else:
        t = jnp.asarray(t)
        if t.ndim != 2:
            raise ValueError(f"diffusion forcing needs per-frame times [B, T], got {tuple(t.shape)}")
    return flow_matching_loss(fn, x0, cond, k_n, t=t, noise=noise, weighting=weighting, loss_scale=loss_scale)
