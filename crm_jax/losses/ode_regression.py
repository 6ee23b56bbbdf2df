"""ODE regression (CausVid / Self-Forcing baseline initialisation of a few-step causal student)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from crm_jax import diffusion as D
from crm_jax.losses import common as C

Array = jax.Array
sg = jax.lax.stop_gradient


def ode_regression_loss(
    fn,
    x_traj: Array,
    t_traj: Array,
    x_target: Array,
    cond: Any,
    key: Array,
    *,
    sizes: Sequence[int] | None = None,
    index: Array | None = None,
    loss_scale: float = 1.0,
):
    """Regress the teacher ODE endpoint from intermediate trajectory points.

    The teacher trajectory holds states ``x_traj[:, k]`` at RF times ``t_traj[k]`` (``k < K``) and its
    endpoint ``x_target`` (the teacher's x0). One index ``k`` is drawn per sample (or per block of frames
    when ``sizes`` is given, as in CausVid's per-chunk timesteps), and::

        x_in   = x_traj[b, k_b]          t_in = t_traj[k_b]     ([B] or per-frame [B, T])
        x0_hat = x_in - t_in * fn(x_in, t_in, cond)
        L      = loss_scale * mean (x0_hat - x_target)^2

    Args:
      fn: student velocity network.
      x_traj: ``[B, K, ...]`` trajectory points (e.g. from ``euler_sample(..., return_trajectory=True)``
        restricted to the few-step grid times).
      t_traj: ``[K]`` RF times of those points (in ``(0, 1]``).
      x_target: ``[B, ...]`` ODE endpoint.
      sizes: optional frames per block (``x_target`` then ``[B, T, ...]``): independent index per block.
      index: optional explicit indices ``[B]`` (or ``[B, num_blocks]`` with ``sizes``).
    Returns:
      ``(loss, {"loss", "t_mean"})``.
    """
    x_target = C.check_x(x_target, "x_target")
    x_traj = jnp.asarray(x_traj)
    B = x_target.shape[0]
    if x_traj.ndim != x_target.ndim + 1 or x_traj.shape[0] != B or x_traj.shape[2:] != x_target.shape[1:]:
        raise ValueError(
            f"x_traj must be [B, K, ...] = [{B}, K, {', '.join(map(str, x_target.shape[1:]))}], "
            f"got {tuple(x_traj.shape)}"
        )
    K = x_traj.shape[1]
    t_traj = jnp.asarray(t_traj)
    if t_traj.shape != (K,):
        raise ValueError(f"t_traj must be [K] = [{K}], got {tuple(t_traj.shape)}")
    D.check_time(t_traj, name="t_traj")
    C.check_conds(x_target, cond)
    dt = D.compute_dtype(x_target)
    if sizes is None:
        idx = jax.random.randint(key, (B,), 0, K) if index is None else jnp.asarray(index)
        if idx.shape != (B,):
            raise ValueError(f"index must be [B] = [{B}], got {tuple(idx.shape)}")
        x_in = jnp.take_along_axis(x_traj, idx.reshape((B, 1) + (1,) * (x_traj.ndim - 2)), axis=1)[:, 0]
        t_in = t_traj[idx]
    else:
        if x_target.ndim < 2:
            raise ValueError("per-block indices need x_target [B, T, ...]")
        sizes = D.check_block_sizes(sizes, x_target.shape[1])
        idx_b = jax.random.randint(key, (B, len(sizes)), 0, K) if index is None else jnp.asarray(index)
        if idx_b.shape != (B, len(sizes)):
            raise ValueError(f"index must be [B, num_blocks] = [{B}, {len(sizes)}], got {tuple(idx_b.shape)}")
        idx = D.expand_block_times(idx_b, sizes)  # [B, T]
        x_in = jnp.take_along_axis(x_traj, idx.reshape((B, 1) + idx.shape[1:] + (1,) * (x_traj.ndim - 3)), axis=1)[:, 0]
        t_in = t_traj[idx]
    x_in = sg(x_in.astype(dt))
    t_in = t_in.astype(dt)
    x0_hat = D.x0_from_v(x_in, t_in, D.call_net(fn, x_in, t_in, cond).astype(dt))
    mse = jnp.mean(jnp.square(x0_hat - sg(x_target.astype(dt))))
    loss = loss_scale * mse
    return loss, C.scalar_metrics(loss=loss, t_mean=jnp.mean(t_in))
