"""Diffusion parameterisations, time conversions, time samplers and sampling grids.

Conventions (fixed for the whole project):

* Rectified flow (RF): ``x_t = (1 - t) * x0 + t * eps``, velocity ``v = eps - x0``,
  RF time ``t`` in ``[0, 1]`` (``t = 0`` is data, ``t = 1`` is noise). Network
  callables take RF ``t`` directly (NOT ``1000 * t``; Wan's ``1000 * t`` scaling is
  the model's business).
* EDM sigma: ``sigma = t / (1 - t)``; ``x_sigma = x0 + sigma * eps = x_t / (1 - t)``.
* TrigFlow: ``x_s = cos(s) * x0 + sin(s) * eps``, ``s`` in ``[0, pi/2]``,
  ``sigma = tan(s)``; ``x_s = (cos s + sin s) * x_t``. TrigFlow velocity
  ``F = dx_s/ds = cos(s) * eps - sin(s) * x0``.
* Arrays are batch-major ``[B, ...]``; videos are channels-last ``[B, T, H, W, C]``.
  A time array is either per-sample ``[B]`` or per-frame ``[B, T]`` and is broadcast
  to ``x`` by appending singleton axes (``t.shape`` must be a prefix of ``x.shape``).
* A network callable has signature ``fn(x, t, cond) -> velocity`` with ``velocity.shape
  == x.shape`` and ``cond`` an arbitrary pytree that is passed through untouched
  (for classifier-free guidance pass a ``cond`` and an ``uncond`` pytree).
* Teacher forcing packs ``[clean context | noisy]`` along the frame axis 1:
  ``x_packed = concat([x0, x_t], axis=1)``, ``t_packed = concat([0, t], axis=1)``
  (see :func:`pack_teacher_forcing`); a callable given packed input returns packed
  output and the losses read the noisy half ``out[:, T:]``.

Everything random takes an explicit ``jax.random`` key. Public entry points raise
``ValueError`` on shape mismatches and, when the values are concrete (not traced),
on times outside their domain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Net = Callable[[Array, Array, Any], Array]
TimeSampler = Callable[..., Array]

__all__ = [
    # validation / broadcasting
    "expand_time",
    "check_time",
    "check_cond",
    "compute_dtype",
    # time conversions
    "rf_to_sigma",
    "sigma_to_rf",
    "sigma_to_trig",
    "trig_to_sigma",
    "rf_to_trig",
    "trig_to_rf",
    "shift_time",
    "unshift_time",
    # data-space conversions
    "rf_noise",
    "trig_noise",
    "rf_to_trig_x",
    "trig_to_rf_x",
    "rf_to_sigma_x",
    "sigma_to_rf_x",
    "x0_from_v",
    "eps_from_v",
    "v_from_x0",
    "v_from_eps",
    "v_from_x0_eps",
    "trig_velocity",
    "x0_from_trig",
    "eps_from_trig",
    "trig_velocity_from_v",
    # TrigFlow wrapper and guidance
    "trigflow_predict",
    "trigflow_fn",
    "cfg",
    "guided_velocity",
    "guided",
    # time samplers
    "sample_lognormal_t",
    "sample_uniform_shift_t",
    "lognormal_sampler",
    "uniform_shift_sampler",
    "block_sizes",
    "expand_block_times",
    "sample_block_times",
    # grids and samplers
    "SF_MID_TIMES",
    "few_step_times",
    "shifted_time_grid",
    "euler_sample",
    "few_step_sample",
    # teacher forcing packing
    "pack_teacher_forcing",
    "unpack_noisy",
]


# --------------------------------------------------------------------------------------
# Validation and broadcasting helpers
# --------------------------------------------------------------------------------------


def is_concrete(x) -> bool:
    """True when `x` (any shape) holds values, False when it is a tracer inside `jit` / `grad`."""
    return not isinstance(x, jax.core.Tracer)


def compute_dtype(*xs) -> jnp.dtype:
    """Floating dtype for loss arithmetic: the inputs' promoted dtype, at least float32."""
    dt = jnp.float32
    for x in xs:
        if x is not None and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            dt = jnp.promote_types(dt, x.dtype)
    return jnp.dtype(dt)


def check_time(t, *, lo: float = 0.0, hi: float = 1.0, name: str = "t") -> None:
    """Raise ``ValueError`` if concrete ``t`` has values outside ``[lo, hi]`` or NaN.

    Traced values (inside ``jit``/``grad``) cannot be inspected and are not checked.
    """
    if t is None or not is_concrete(t):
        return
    a = np.asarray(t, dtype=np.float64)
    if not a.size:
        return
    if np.isnan(a).any():
        raise ValueError(f"{name} must lie in [{lo}, {hi}]; got NaN")
    if a.min() < lo - 1e-12 or a.max() > hi + 1e-12:
        raise ValueError(f"{name} must lie in [{lo}, {hi}]; got values in [{a.min()}, {a.max()}]")


def expand_time(t: Array, x: Array, name: str = "t") -> Array:
    """Broadcast a time array to ``x`` by appending singleton axes.

    Args:
      t: scalar, per-sample ``[B]`` or per-frame ``[B, T]`` times; ``t.shape`` must equal
        ``x.shape[:t.ndim]``.
      x: array ``[B, ...]``.
    Returns:
      ``t`` reshaped to ``t.shape + (1,) * (x.ndim - t.ndim)``.
    Raises:
      ValueError: if ``t.shape`` is not a prefix of ``x.shape``.
    """
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    if t.ndim > x.ndim or tuple(t.shape) != tuple(x.shape[: t.ndim]):
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} does not match x of shape {tuple(x.shape)}: "
            f"{name} must be per-sample [B] or per-frame [B, T], a prefix of x.shape"
        )
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def check_time_shape(t, x, name="t", allow_scalar=False):
    """`t` as an array after checking that it is per-sample `[B]` or per-frame `[B, T]` for
    `x [B, T, ...]` (a scalar `[]` only with `allow_scalar`)."""
    t = jnp.asarray(t)
    if t.ndim == 0 and not allow_scalar:
        raise ValueError(f"{name} must be per-sample [B] or per-frame [B, T], got a scalar")
    expand_time(t, x, name)
    return t


def check_cond(cond: Any, batch: int, name: str = "cond") -> None:
    """Check that every array leaf of ``cond`` with ``ndim >= 1`` has leading dim ``batch`` or 1.

    ``cond`` is otherwise an arbitrary pytree (``None`` allowed); non-array leaves are ignored.
    """
    if cond is None:
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        if isinstance(leaf, (jax.Array, np.ndarray)) and leaf.ndim >= 1:
            if leaf.shape[0] not in (batch, 1):
                raise ValueError(
                    f"{name} leaf {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}: "
                    f"its leading (batch) dim must be {batch} or 1"
                )


def call_net(fn: Net, x: Array, t: Array, cond: Any, name: str = "fn") -> Array:
    """`fn(x, t, cond)` for `x [B, T, H, W, C]`, `t [B]` or `[B, T]`; raises unless the output is
    shaped like `x` (a network callable returns a velocity `[B, T, H, W, C]`)."""
    out = fn(x, t, cond)
    if tuple(out.shape) != tuple(x.shape):
        raise ValueError(
            f"{name} returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}; "
            "a network callable must return a velocity shaped like its input"
        )
    return out


# --------------------------------------------------------------------------------------
# Time conversions (elementwise)
# --------------------------------------------------------------------------------------


def rf_to_sigma(t: Array) -> Array:
    """EDM sigma from RF time: ``sigma = t / (1 - t)`` (``inf`` at ``t = 1``)."""
    t = jnp.asarray(t)
    return t / (1.0 - t)


def sigma_to_rf(sigma: Array) -> Array:
    """RF time from EDM sigma: ``t = sigma / (1 + sigma)``."""
    sigma = jnp.asarray(sigma)
    return sigma / (1.0 + sigma)


def sigma_to_trig(sigma: Array) -> Array:
    """TrigFlow time from sigma: ``s = arctan(sigma)``."""
    return jnp.arctan(jnp.asarray(sigma))


def trig_to_sigma(s: Array) -> Array:
    """Sigma from TrigFlow time: ``sigma = tan(s)``."""
    return jnp.tan(jnp.asarray(s))


def rf_to_trig(t: Array) -> Array:
    """TrigFlow time from RF time: ``s = arctan(t / (1 - t)) = atan2(t, 1 - t)`` (exact at t = 1)."""
    t = jnp.asarray(t)
    return jnp.arctan2(t, 1.0 - t)


def trig_to_rf(s: Array) -> Array:
    """RF time from TrigFlow time: ``t = tan s / (1 + tan s) = sin s / (sin s + cos s)``."""
    s = jnp.asarray(s)
    return jnp.sin(s) / (jnp.sin(s) + jnp.cos(s))


def shift_time(u: Array, shift: float) -> Array:
    """Timestep shift: ``t = k * u / (1 + (k - 1) * u)`` (identity for ``k = 1``)."""
    u = jnp.asarray(u)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(t: Array, shift: float) -> Array:
    """Inverse of :func:`shift_time`: ``u = t / (k - (k - 1) * t)``."""
    t = jnp.asarray(t)
    return t / (shift - (shift - 1.0) * t)


# --------------------------------------------------------------------------------------
# Data-space conversions
# --------------------------------------------------------------------------------------


def rf_noise(x0: Array, eps: Array, t: Array) -> Array:
    """``x_t = (1 - t) * x0 + t * eps``; ``t`` is ``[B]`` / ``[B, T]`` / scalar."""
    tb = expand_time(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def trig_noise(x0: Array, eps: Array, s: Array) -> Array:
    """``x_s = cos(s) * x0 + sin(s) * eps``."""
    sb = expand_time(s, x0)
    return jnp.cos(sb) * x0 + jnp.sin(sb) * eps


def rf_to_trig_x(x_t: Array, t: Array) -> Array:
    """TrigFlow state from RF state at the same noise level: ``x_s = x_t / sqrt((1-t)^2 + t^2)``."""
    tb = expand_time(t, x_t)
    return x_t / jnp.sqrt((1.0 - tb) ** 2 + tb**2)


def trig_to_rf_x(x_s: Array, s: Array) -> Array:
    """RF state from TrigFlow state: ``x_t = x_s / (cos s + sin s)`` (``c_in`` of the wrapper)."""
    sb = expand_time(s, x_s)
    return x_s / (jnp.cos(sb) + jnp.sin(sb))


def rf_to_sigma_x(x_t: Array, t: Array) -> Array:
    """EDM state ``x0 + sigma * eps`` from RF state: ``x_t / (1 - t)``."""
    return x_t / (1.0 - expand_time(t, x_t))


def sigma_to_rf_x(x_sigma: Array, sigma: Array) -> Array:
    """RF state from EDM state: ``x_t = x_sigma / (1 + sigma)``."""
    return x_sigma / (1.0 + expand_time(sigma, x_sigma))


def x0_from_v(x_t: Array, t: Array, v: Array) -> Array:
    """``x0 = x_t - t * v``."""
    return x_t - expand_time(t, x_t) * v


def eps_from_v(x_t: Array, t: Array, v: Array) -> Array:
    """``eps = x_t + (1 - t) * v``."""
    return x_t + (1.0 - expand_time(t, x_t)) * v


def v_from_x0(x_t: Array, t: Array, x0: Array) -> Array:
    """``v = (x_t - x0) / t`` (undefined at ``t = 0``)."""
    return (x_t - x0) / expand_time(t, x_t)


def v_from_eps(x_t: Array, t: Array, eps: Array) -> Array:
    """``v = (eps - x_t) / (1 - t)`` (undefined at ``t = 1``)."""
    return (eps - x_t) / (1.0 - expand_time(t, x_t))


def v_from_x0_eps(x0: Array, eps: Array) -> Array:
    """``v = eps - x0``."""
    return eps - x0


def trig_velocity(x0: Array, eps: Array, s: Array) -> Array:
    """TrigFlow velocity ``F = cos(s) * eps - sin(s) * x0``."""
    sb = expand_time(s, x0)
    return jnp.cos(sb) * eps - jnp.sin(sb) * x0


def x0_from_trig(x_s: Array, s: Array, F: Array) -> Array:
    """``x0 = cos(s) * x_s - sin(s) * F``."""
    sb = expand_time(s, x_s)
    return jnp.cos(sb) * x_s - jnp.sin(sb) * F


def eps_from_trig(x_s: Array, s: Array, F: Array) -> Array:
    """``eps = sin(s) * x_s + cos(s) * F``."""
    sb = expand_time(s, x_s)
    return jnp.sin(sb) * x_s + jnp.cos(sb) * F


def trig_velocity_from_v(x_t: Array, t: Array, v: Array) -> Array:
    """TrigFlow velocity from an RF state/velocity at the same noise level.

    ``F = cos s * eps_hat - sin s * x0_hat = (cos s - sin s) * x_t + v / (cos s + sin s)``
    with ``s = rf_to_trig(t)``, ``x0_hat = x_t - t v``, ``eps_hat = x_t + (1 - t) v``.
    """
    s = rf_to_trig(t)
    sb = expand_time(s, x_t)
    c, sn = jnp.cos(sb), jnp.sin(sb)
    return (c - sn) * x_t + v / (c + sn)


# --------------------------------------------------------------------------------------
# TrigFlow wrapper around an RF velocity network, guidance
# --------------------------------------------------------------------------------------


def trigflow_predict(fn: Net, x_s: Array, s: Array, cond: Any) -> tuple[Array, Array]:
    """Evaluate an RF velocity network in TrigFlow coordinates.

    With ``c_in = 1 / (cos s + sin s)`` and RF time ``t = sin s / (sin s + cos s)``::

        v     = fn(c_in * x_s, t, cond)
        x0_hat = c_in * x_s - (sin s / (cos s + sin s)) * v          (= x_t - t v)
        F     = (cos s * x_s - x0_hat) / sin s                      (docs/design.md §4)
              = (cos s - sin s) * c_in * x_s + c_in * v             (form used: no 1/sin s)

    For a network predicting the true velocity ``eps - x0`` this gives
    ``F = cos s * eps - sin s * x0``. Differentiable in ``x_s`` and ``s`` (usable in
    ``jax.jvp``; the s-dependence of ``c_in`` and ``t`` is differentiated too).

    Args:
      fn: RF velocity network ``fn(x, t, cond)``.
      x_s: TrigFlow state ``[B, ...]``.
      s: TrigFlow time ``[B]`` or ``[B, T]`` in ``[0, pi/2]``.
      cond: conditioning pytree passed through.
    Returns:
      ``(x0_hat, F)``, both shaped like ``x_s``.
    """
    sb = expand_time(s, x_s, "s")
    c, sn = jnp.cos(sb), jnp.sin(sb)
    c_in = 1.0 / (c + sn)
    t = trig_to_rf(s)
    x_t = c_in * x_s
    v = call_net(fn, x_t, t, cond)
    tb = expand_time(t, x_s)
    x0_hat = x_t - tb * v
    F = (c - sn) * x_t + c_in * v
    return x0_hat, F


def trigflow_fn(fn: Net) -> Net:
    """Return ``F_fn(x_s, s, cond) -> F``: the TrigFlow velocity of an RF velocity network."""

    def F_fn(x_s, s, cond):
        return trigflow_predict(fn, x_s, s, cond)[1]

    return F_fn


def cfg(v_cond: Array, v_uncond: Array, guidance) -> Array:
    """Classifier-free guidance: ``v_u + w * (v_c - v_u)``."""
    return v_uncond + guidance * (v_cond - v_uncond)


def guidance_is_one(guidance) -> bool:
    """True when the CFG scale is the Python number 1 (only the conditional call is needed); a
    traced or array scale (shape `[]`) counts as not one."""
    return isinstance(guidance, (int, float)) and float(guidance) == 1.0


def guided_velocity(fn: Net, x: Array, t: Array, cond: Any, uncond: Any = None, guidance=1.0) -> Array:
    """Guided prediction ``fn_u + w * (fn_c - fn_u)`` from two calls of ``fn``.

    With ``guidance == 1`` (Python number) only the conditional call is made. Works for any
    output that is affine in the velocity (v, x0_hat, F). ``guidance != 1`` needs ``uncond``.
    """
    v_c = call_net(fn, x, t, cond)
    if guidance_is_one(guidance):
        return v_c
    if uncond is None:
        raise ValueError("guidance != 1 needs an `uncond` (negative / unconditional) pytree")
    v_u = call_net(fn, x, t, uncond)
    return cfg(v_c, v_u, guidance)


def guided(fn: Net, uncond: Any = None, guidance=1.0) -> Net:
    """Wrap ``fn`` into a guided network callable ``g(x, t, cond) = fn_u + w (fn_c - fn_u)``."""
    if not guidance_is_one(guidance) and uncond is None:
        raise ValueError("guidance != 1 needs an `uncond` (negative / unconditional) pytree")

    def g(x, t, cond):
        return guided_velocity(fn, x, t, cond, uncond, guidance)

    return g


# --------------------------------------------------------------------------------------
# Time samplers
# --------------------------------------------------------------------------------------


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)


def sample_lognormal_t(key: Array, shape, p_mean: float = -0.8, p_std: float = 1.6, dtype=jnp.float32) -> Array:
    """LogNormal on sigma, returned as RF time (= logit-normal RF time).

    ``log sigma ~ N(p_mean, p_std^2)``, ``t = sigma / (1 + sigma) = sigmoid(log sigma)``.
    Common settings: ``(-0.8, 1.6)`` (student sCM), ``(0.7, 1.6)``, ``(-0.4, 1.0)`` (MeanFlow).
    Returns RF times of ``shape`` in ``(0, 1)``.
    """
    if p_std < 0:
        raise ValueError(f"p_std must be >= 0, got {p_std}")
    n = jax.random.normal(key, _shape(shape), dtype=dtype)
    return jax.nn.sigmoid(p_mean + p_std * n)


def sample_uniform_shift_t(key: Array, shape, shift: float = 5.0, dtype=jnp.float32) -> Array:
    """UniformShift(k): ``u ~ U[0, 1)``, ``t = k u / (1 + (k - 1) u)``. Returns RF times in ``[0, 1)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = jax.random.uniform(key, _shape(shape), dtype=dtype)
    return shift_time(u, shift)


def lognormal_sampler(p_mean: float = -0.8, p_std: float = 1.6) -> TimeSampler:
    """A sampler ``sampler(key, shape, dtype) -> t`` for :func:`sample_lognormal_t`."""
    return functools.partial(sample_lognormal_t, p_mean=p_mean, p_std=p_std)


def uniform_shift_sampler(shift: float = 5.0) -> TimeSampler:
    """A sampler ``sampler(key, shape, dtype) -> t`` for :func:`sample_uniform_shift_t`."""
    return functools.partial(sample_uniform_shift_t, shift=shift)


def block_sizes(num_frames: int, chunk_frames: int, first_chunk_frames: int | None = None) -> tuple[int, ...]:
    """Frames per attention block for the pattern ``[first][chunk][chunk]...``.

    The first block holds ``first_chunk_frames`` (default ``chunk_frames``) frames, later blocks
    ``chunk_frames``; a final partial block takes the remainder (same rule as ``MaskSpec``).
    E.g. ``block_sizes(7, 3, 1) == (1, 3, 3)``.
    """
    first = chunk_frames if first_chunk_frames is None else first_chunk_frames
    if num_frames <= 0 or chunk_frames <= 0 or first <= 0:
        raise ValueError(
            f"num_frames, chunk_frames, first_chunk_frames must be positive, got {num_frames}, {chunk_frames}, {first}"
        )
    sizes = [min(first, num_frames)]
    while sum(sizes) < num_frames:
        sizes.append(min(chunk_frames, num_frames - sum(sizes)))
    return tuple(sizes)


def check_block_sizes(sizes: Sequence[int], num_frames: int | None = None) -> tuple[int, ...]:
    """Frames per block (positive ints, summing to `num_frames` when given) as a tuple."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"block sizes must be a non-empty sequence of positive ints, got {sizes}")
    if num_frames is not None and sum(sizes) != num_frames:
        raise ValueError(f"block sizes {sizes} sum to {sum(sizes)}, but x has {num_frames} frames")
    return sizes


def expand_block_times(t_blocks: Array, sizes: Sequence[int]) -> Array:
    """Broadcast per-block times ``[B, num_blocks]`` to per-frame times ``[B, sum(sizes)]``."""
    sizes = check_block_sizes(sizes)
    t_blocks = jnp.asarray(t_blocks)
    if t_blocks.ndim != 2 or t_blocks.shape[1] != len(sizes):
        raise ValueError(f"t_blocks must be [B, {len(sizes)}], got {tuple(t_blocks.shape)}")
    return jnp.repeat(t_blocks, np.asarray(sizes), axis=1, total_repeat_length=sum(sizes))


def sample_block_times(
    key: Array, batch: int, sizes: Sequence[int], sampler: TimeSampler | None = None, dtype=jnp.float32
) -> Array:
    """Diffusion-forcing times: one independent RF time per block, broadcast to its frames.

    Args:
      key: PRNG key.
      batch: B.
      sizes: frames per block (e.g. from :func:`block_sizes`).
      sampler: ``sampler(key, shape, dtype) -> t``; default UniformShift(5).
    Returns:
      per-frame times ``[B, sum(sizes)]``, constant within each block.
    """
    sizes = check_block_sizes(sizes)
    sampler = sampler or uniform_shift_sampler(5.0)
    return expand_block_times(sampler(key, (batch, len(sizes)), dtype=dtype), sizes)


# --------------------------------------------------------------------------------------
# Grids and samplers
# --------------------------------------------------------------------------------------

SF_MID_TIMES = (15.0 / 16.0, 5.0 / 6.0, 5.0 / 8.0)


def few_step_times(num_steps: int, sigma_max: float = 1600.0, mid_times: Sequence[float] = SF_MID_TIMES) -> np.ndarray:
    """Few-step RF grid for self-forcing rollouts and student inference.

    ``[sigma_max / (sigma_max + 1), *mid_times[:num_steps - 1], 0]`` (``num_steps + 1`` values,
    float64 numpy). With the defaults and ``num_steps = 4``:
    ``[1600/1601, 15/16, 5/6, 5/8, 0]``. Use ``sigma_max = 1600`` at inference, 80 (or any) in training.
    """
    if num_steps < 1 or num_steps - 1 > len(mid_times):
        raise ValueError(
            f"num_steps must be in [1, {len(mid_times) + 1}] for mid_times {tuple(mid_times)}, got {num_steps}"
        )
    if sigma_max <= 0:
        raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
    ts = np.array([sigma_max / (sigma_max + 1.0), *list(mid_times)[: num_steps - 1], 0.0], dtype=np.float64)
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"grid must be strictly decreasing, got {ts}")
    return ts


def shifted_time_grid(num_steps: int, shift: float = 5.0, t_max: float = 1.0) -> np.ndarray:
    """Shifted Euler teacher grid: ``shift_time(linspace(unshift_time(t_max), 0, N + 1), shift)``.

    Returns ``N + 1`` decreasing RF times (float64 numpy) from ``t_max`` to 0. ``t_max`` can be
    ``sigma_max / (sigma_max + 1)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u_max = t_max / (shift - (shift - 1.0) * t_max)
    u = np.linspace(u_max, 0.0, num_steps + 1, dtype=np.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def euler_sample(
    fn: Net,
    noise: Array,
    cond: Any,
    *,
    num_steps: int = 50,
    shift: float = 5.0,
    t_max: float = 1.0,
    uncond: Any = None,
    guidance=1.0,
    times: Sequence[float] | None = None,
    return_trajectory: bool = False,
):
    """Euler ODE sampler for an RF velocity network (teacher sampling, ODE-pair generation).

    ``x_{i+1} = x_i + (t_{i+1} - t_i) * v_i`` with ``v_i = guided_velocity(fn, x_i, t_i, cond, uncond,
    guidance)`` over the grid ``times`` (default :func:`shifted_time_grid` ``(num_steps, shift, t_max)``),
    starting from ``x_0 = noise`` at ``t_0``. Times given to ``fn`` are per-sample ``[B]``.

    Args:
      fn: RF velocity network.
      noise: ``[B, ...]`` standard normal.
      cond / uncond / guidance: conditioning and CFG (``guidance = 1`` makes one call per step).
    Returns:
      ``x0`` ``[B, ...]``; with ``return_trajectory=True`` also ``(traj, times)``, ``traj`` of shape
      ``[B, N + 1, ...]`` (``traj[:, 0] = noise``, ``traj[:, -1] = x0``) and ``times`` ``[N + 1]``.
    """
    noise = jnp.asarray(noise)
    if noise.ndim < 1:
        raise ValueError("noise must be [B, ...]")
    check_cond(cond, noise.shape[0])
    check_cond(uncond, noise.shape[0], "uncond")
    ts = shifted_time_grid(num_steps, shift, t_max) if times is None else np.asarray(times, np.float64)
    if ts.ndim != 1 or ts.size < 2 or np.any(np.diff(ts) >= 0):
        raise ValueError(f"times must be a strictly decreasing 1-D grid, got {ts}")
    check_time(ts, name="times")
    B = noise.shape[0]
    ts_j = jnp.asarray(ts, dtype=noise.dtype)

    def step(x, tt):
        t_cur, t_next = tt
        v = guided_velocity(fn, x, jnp.full((B,), t_cur, x.dtype), cond, uncond, guidance)
        x_next = (x + (t_next - t_cur) * v).astype(x.dtype)
        return x_next, x_next

    x, traj = jax.lax.scan(step, noise, (ts_j[:-1], ts_j[1:]))
    if not return_trajectory:
        return x
    traj = jnp.concatenate([noise[None], traj], axis=0)
    return x, (jnp.moveaxis(traj, 0, 1), ts_j)


def few_step_sample(
    fn: Net,
    noise: Array,
    cond: Any,
    key: Array,
    *,
    num_steps: int = 4,
    sigma_max: float = 1600.0,
    mid_times: Sequence[float] = SF_MID_TIMES,
):
    """Few-step consistency sampling on :func:`few_step_times`.

    Each step predicts ``x0_hat = x - t_i * fn(x, t_i, cond)`` and, except at the last step, re-noises
    with fresh noise: ``x = (1 - t_{i+1}) x0_hat + t_{i+1} eps_i`` (``eps_i`` from ``key``). The first
    input is ``noise`` itself (placed at ``t_0 = sigma_max / (sigma_max + 1)``).
    Returns ``x0_hat`` ``[B, ...]``.
    """
    noise = jnp.asarray(noise)
    check_cond(cond, noise.shape[0])
    ts = few_step_times(num_steps, sigma_max, mid_times)
    B = noise.shape[0]
    x = noise
    keys = jax.random.split(key, max(num_steps - 1, 1))
    x0 = x
    for i in range(num_steps):
        t = jnp.full((B,), ts[i], noise.dtype)
        x0 = x0_from_v(x, t, call_net(fn, x, t, cond))
        if i < num_steps - 1:
            eps = jax.random.normal(keys[i], noise.shape, noise.dtype)
            x = rf_noise(x0, eps, jnp.full((B,), ts[i + 1], noise.dtype))
    return x0


# --------------------------------------------------------------------------------------
# Teacher-forcing packing
# --------------------------------------------------------------------------------------


def pack_teacher_forcing(x_ctx: Array, x_t: Array, t: Array, t_ctx: Array | None = None) -> tuple[Array, Array]:
    """Pack ``[clean context | noisy]`` along the frame axis for teacher forcing.

    Args:
      x_ctx: context frames ``[B, T, ...]`` (clean ``x0``).
      x_t: noisy frames ``[B, T, ...]``.
      t: times of the noisy frames, ``[B]`` (broadcast over frames) or ``[B, T]``.
      t_ctx: context times ``[B, T]`` / ``[B]``; default zeros (clean context at ``t = 0``).
    Returns:
      ``(x_packed [B, 2T, ...], t_packed [B, 2T])`` with ``x_packed = concat([x_ctx, x_t], 1)`` and
      ``t_packed = concat([t_ctx, t], 1)``.
    """
    if x_ctx.ndim < 2 or tuple(x_ctx.shape) != tuple(x_t.shape):
        raise ValueError(
            f"context {tuple(x_ctx.shape)} and noisy {tuple(x_t.shape)} must share the shape [B, T, ...] (frame axis 1)"
        )
    B, T = x_t.shape[:2]
    t = check_time_shape(t, x_t)
    t_frames = jnp.broadcast_to(t[:, None], (B, T)) if t.ndim == 1 else t
    if t_frames.ndim != 2:
        raise ValueError(f"t must be [B] or [B, T], got {tuple(t.shape)}")
    if t_ctx is None:
        t_ctx = jnp.zeros_like(t_frames)
    else:
        t_ctx = check_time_shape(t_ctx, x_t, "t_ctx")
        t_ctx = jnp.broadcast_to(t_ctx[:, None], (B, T)) if t_ctx.ndim == 1 else t_ctx
    return (jnp.concatenate([x_ctx, x_t], axis=1), jnp.concatenate([t_ctx.astype(t_frames.dtype), t_frames], axis=1))


def unpack_noisy(y_packed: Array, num_frames: int) -> Array:
    """Noisy half ``y_packed[:, T:]`` of a packed teacher-forcing output ``[B, 2T, ...]``."""
    if y_packed.ndim < 2 or y_packed.shape[1] != 2 * num_frames:
        raise ValueError(f"packed output must be [B, {2 * num_frames}, ...], got {tuple(y_packed.shape)}")
    return y_packed[:, num_frames:]
