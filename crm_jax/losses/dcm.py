"""Discrete-time consistency distillation (dCM) and its teacher-forcing variant (TF-dCM).

The returned loss ALREADY INCLUDES ``loss_scale = 100``.
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


def dcm_times(
    key: Array, batch: int, *, num_steps: int = 48, shift: float = 5.0, discrete: bool = False, dtype=jnp.float32
) -> tuple[Array, Array]:
    """Adjacent times ``(t0, t1)``, ``t0 > t1``, on the shifted ``num_steps``-step grid.

    ``u ~ U[0, 1 - 1/N)`` (``discrete=True``: ``u = i / N``, ``i ~ U{0..N-2}``),
    ``t0 = shift_time(1 - u, shift)``, ``t1 = shift_time(1 - u - 1/N, shift)``; each ``[B]``.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    du = 1.0 / num_steps
    if discrete:
        u = jax.random.randint(key, (batch,), 0, num_steps - 1).astype(dtype) * du
    else:
        u = jax.random.uniform(key, (batch,), dtype) * (1.0 - du)
    return D.shift_time(1.0 - u, shift), D.shift_time(1.0 - u - du, shift)


def dcm_loss(
    fn,
    teacher_fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    uncond: Any = None,
    guidance=1.0,
    num_steps: int = 48,
    shift: float = 5.0,
    discrete: bool = False,
    teacher_forcing: bool = False,
    t0: Array | None = None,
    t1: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 100.0,
):
    """dCM / TF-dCM loss: one guided teacher Euler step ``t0 -> t1`` and a stop-gradient student target.

    ``(t0, t1)`` adjacent on the shifted N-step grid (:func:`dcm_times`; or given, ``[B]``),
    ``x_t0 = (1 - t0) x0 + t0 eps``::

        x_t1   = x_t0 - (t0 - t1) v_T(x_t0, t0)                           (guided teacher, CFG)
        x0_hat(x, t) = x - t * fn(x, t)                                   (student)
        L      = loss_scale * mean_b sum (x0_hat(x_t0, t0) - sg(x0_hat(x_t1, t1)))^2   (loss_scale = 100)

    With ``teacher_forcing=True`` (TF-dCM) every network call sees the packed sequence
    ``[x0 | x]`` with times ``[0 | t]`` (``[B, 2T, ...]``, ``[B, 2T]``) and the noisy half of the output is used.

    Args:
      fn: student velocity network (trainable; the target pass is stop-gradiented).
      teacher_fn: teacher velocity network; ``uncond``/``guidance`` for CFG.
      x0: ``[B, ...]`` (``[B, T, ...]`` with teacher forcing).
    Returns:
      ``(loss, {"loss", "loss_unscaled", "t0_mean", "dt_mean", "nan_frac"})``.
    """
    x0 = C.check_x(x0, min_ndim=2 if teacher_forcing else 1)
    C.check_conds(x0, cond, uncond, guidance)
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    if (t0 is None) != (t1 is None):
        raise ValueError("pass both t0 and t1, or neither")
    if t0 is None:
        t0, t1 = dcm_times(k_t, x0.shape[0], num_steps=num_steps, shift=shift, discrete=discrete, dtype=dt)
    else:
        if jnp.shape(t0) != jnp.shape(t1):
            raise ValueError(f"t0 {jnp.shape(t0)} and t1 {jnp.shape(t1)} must have the same shape")
        if D.is_concrete(t0) and D.is_concrete(t1) and np.any(np.asarray(t1) >= np.asarray(t0)):
            raise ValueError("dCM needs t0 > t1")
        t0 = C.get_time(t0, x0, k_t, None, dt, name="t0")
        t1 = C.get_time(t1, x0, k_t, None, dt, name="t1")
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    x_t0 = D.rf_noise(x0, eps, t0)
    teacher = D.guided(teacher_fn, uncond, guidance)

    def call(f, x, t):
        if teacher_forcing:
            x_in, t_in = D.pack_teacher_forcing(x0, x, t)
            return D.unpack_noisy(D.call_net(f, x_in, t_in, cond), x0.shape[1]).astype(dt)
        return D.call_net(f, x, t, cond).astype(dt)

    v_T = sg(call(teacher, x_t0, t0))
    x_t1 = sg(x_t0 - D.expand_time(t0 - t1, x0) * v_T)
    x0_pred = D.x0_from_v(x_t0, t0, call(fn, x_t0, t0))
    x0_tgt = sg(D.x0_from_v(x_t1, t1, call(fn, x_t1, t1)))
    diff = x0_pred - x0_tgt
    bad = C.bad_samples(diff)
    per = C.sum_per_sample(jnp.square(C.mask_samples(bad, diff)))
    loss_unscaled = jnp.mean(per)
    loss = loss_scale * loss_unscaled
    return loss, C.scalar_metrics(
        loss=loss,
        loss_unscaled=loss_unscaled,
        t0_mean=jnp.mean(t0),
        dt_mean=jnp.mean(t0 - t1),
        nan_frac=jnp.mean(bad.astype(jnp.float32)),
    )
