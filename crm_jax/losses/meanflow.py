"""MeanFlow loss: average velocity ``u(z, r, t)`` trained through the MeanFlow identity.

``u(z_t, r, t) = (1 / (t - r)) * integral_r^t v(z_tau, tau) dtau`` so that ``z_r = z_t - (t - r) u``.
The identity ``u = v - (t - r) du/dt`` (total derivative along ``dz/dt = v``) gives the target.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import diffusion as D
from crm_jax.losses import common as C

Array = jax.Array
sg = jax.lax.stop_gradient


def sample_meanflow_times(
    key: Array,
    batch: int,
    *,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    r_equals_t_fraction: float = 0.75,
    dtype=jnp.float32,
) -> tuple[Array, Array]:
    """``(r, t)``, each ``[B]``: two logit-normal RF times, ``t = max``, ``r = min``; with probability
    ``r_equals_t_fraction`` (default 0.75, MeanFlow's 25% of ``r != t``) ``r = t``. ``0 <= r <= t <= 1``."""
    if not 0.0 <= r_equals_t_fraction <= 1.0:
        raise ValueError(f"r_equals_t_fraction must be in [0, 1], got {r_equals_t_fraction}")
    k1, k2, k3 = jax.random.split(key, 3)
    a = D.sample_lognormal_t(k1, (batch,), p_mean, p_std, dtype)
    b = D.sample_lognormal_t(k2, (batch,), p_mean, p_std, dtype)
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    same = jax.random.uniform(k3, (batch,)) < r_equals_t_fraction
    return jnp.where(same, t, r), t


def meanflow_target(u_jvp_fn, z: Array, r: Array, t: Array, v: Array, cond: Any) -> tuple[Array, Array]:
    """MeanFlow target ``sg(v - (t - r) du/dt)``.

    ``u, du/dt = jax.jvp(u_jvp_fn(., ., ., cond), (z, r, t), (v, 0, 1))``. Returns ``(target, du_dt)``.
    ``r``, ``t``: ``[B]`` or ``[B, T]``.
    """
    _, dudt = jax.jvp(
        lambda z_, r_, t_: u_jvp_fn(z_, r_, t_, cond),
        (z, r, t),
        (v.astype(z.dtype), jnp.zeros_like(r), jnp.ones_like(t)),
    )
    dudt = sg(dudt)
    return sg(v - D.expand_time(t - r, z) * dudt), dudt


def meanflow_loss(
    u_fn,
    u_jvp_fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    teacher_fn=None,
    uncond: Any = None,
    guidance=1.0,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    r_equals_t_fraction: float = 0.75,
    adaptive_p: float = 1.0,
    adaptive_c: float = 0.01,
    r: Array | None = None,
    t: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 1.0,
):
    """MeanFlow loss with adaptive weighting.

    ``z = (1 - t) x0 + t eps``; ``v = eps - x0`` (conditional velocity) or, with ``teacher_fn``, the
    stop-gradient guided teacher velocity ``v_T(z, t)`` (distillation)::

        u, du/dt = jvp(u_jvp_fn, (z, r, t), (v, 0, 1))
        target   = sg(v - (t - r) du/dt)
        err      = u_fn(z, r, t, cond) - target
        L        = loss_scale * mean_b  ||err_b||^2 / sg(||err_b||^2 + adaptive_c)^adaptive_p

    ``||.||^2`` sums over all non-batch axes. ``(r, t)`` from :func:`sample_meanflow_times` unless given.

    Args:
      u_fn: average-velocity network ``u_fn(z, r, t, cond)`` with trainable params (grad forward).
      u_jvp_fn: same network with stop-gradient params, used only inside ``jax.jvp``.
      x0: data ``[B, ...]``.
      teacher_fn: optional RF velocity network ``teacher_fn(x, t, cond)``; ``uncond``/``guidance`` for CFG.
      r, t: optional RF times ``[B]`` (or ``[B, T]``), ``r <= t``.
    Returns:
      ``(loss, {"loss", "err_sq" (mean ||err||^2), "weight_mean", "dudt_norm", "r_eq_t_frac", "t_mean"})``.
    """
    x0 = C.check_x(x0)
    C.check_conds(x0, cond, uncond, guidance)
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    if (r is None) != (t is None):
        raise ValueError("pass both r and t, or neither")
    if t is None:
        r, t = sample_meanflow_times(
            k_t, x0.shape[0], p_mean=p_mean, p_std=p_std, r_equals_t_fraction=r_equals_t_fraction, dtype=dt
        )
    else:
        if jnp.shape(r) != jnp.shape(t):
            raise ValueError(f"r {jnp.shape(r)} and t {jnp.shape(t)} must have the same shape")
        if D.is_concrete(r) and D.is_concrete(t) and np.any(np.asarray(r) > np.asarray(t)):
            raise ValueError("MeanFlow needs r <= t")
        r = C.get_time(r, x0, k_t, None, dt, name="r")
        t = C.get_time(t, x0, k_t, None, dt, name="t")
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    z = D.rf_noise(x0, eps, t)
    if teacher_fn is None:
        v = eps - x0
    else:
        v = sg(D.guided_velocity(teacher_fn, z, t, cond, uncond, guidance).astype(dt))
    target, dudt = meanflow_target(u_jvp_fn, z, r, t, v, cond)
    u = u_fn(z, r, t, cond)
    if tuple(u.shape) != tuple(z.shape):
        raise ValueError(f"u_fn returned shape {tuple(u.shape)} for input {tuple(z.shape)}")
    err = u.astype(dt) - target
    err_sq = C.sum_per_sample(jnp.square(err))
    w = 1.0 / sg(err_sq + adaptive_c) ** adaptive_p
    loss = loss_scale * jnp.mean(w * err_sq)
    return loss, C.scalar_metrics(
        loss=loss,
        err_sq=jnp.mean(err_sq),
        weight_mean=jnp.mean(w),
        dudt_norm=jnp.mean(C.norm_per_sample(dudt)),
        r_eq_t_frac=jnp.mean((r == t).astype(jnp.float32)),
        t_mean=jnp.mean(t),
    )
