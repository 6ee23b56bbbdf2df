"""Continuous-time consistency (sCM) losses, TrigFlow form and RF form (teacher forcing).

Both forms return ``loss_scale * mean_b L_b`` with ``loss_scale = 100`` by default, i.e. the
returned loss ALREADY INCLUDES the factor 100 of ``100 * L_sCM``; combine it with DMD through
:func:`crm_jax.losses.rcm_loss`, which does not rescale it again.

Two network callables are required, both plain callables ``f(x, t, cond) -> RF velocity``:

* ``fn``: the ordinary forward with trainable parameters; the loss is differentiated through it.
* ``jvp_fn``: the same network with ``stop_gradient``-ed parameters, used only inside ``jax.jvp``
  for the tangent ``dF/dt``. Keeping it separate means the jvp pass is never reverse-differentiated
  (the attention kernels' jvp op has no transpose rule). Typically::

      fn     = lambda x, t, c: model.apply(params, x, t, c)
      jvp_fn = lambda x, t, c: model.apply(jax.lax.stop_gradient(params), x, t, c)

Per-sample normalisation ``g_hat = g / (||g||_2 + 0.1)`` (``normalise=False``: ``g_hat = g``, an
ablation: every sample then weighs by its ``||g||``); samples whose ``g`` or network output is
non-finite are zeroed (``g``, ``F`` and ``sg(F)``) and counted in ``metrics["nan_frac"]``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crm_jax import diffusion as D
from crm_jax.losses import common as C

Array = jax.Array
sg = jax.lax.stop_gradient


def _finish(out: Array, out_sg: Array, g: Array, tangent: Array, loss_scale, extra: dict, normalise: bool = True):
    """Mask bad samples, normalise g per sample (unless `normalise` is False), reduce. Returns (loss, metrics)."""
    bad = C.bad_samples(g, out)
    g = C.mask_samples(bad, g)
    out = C.mask_samples(bad, out)
    out_sg = C.mask_samples(bad, out_sg)
    g_norm = C.norm_per_sample(g)
    g_hat = g / (D.expand_time(g_norm, g) + 0.1) if normalise else g
    per = C.sum_per_sample(jnp.square(out - out_sg - g_hat))
    loss_unscaled = jnp.mean(per)
    loss = loss_scale * loss_unscaled
    good = ~bad
    n_good = jnp.maximum(jnp.sum(good), 1)
    tan_norm = C.norm_per_sample(jnp.where(jnp.isfinite(tangent), tangent, 0.0))
    metrics = C.scalar_metrics(
        loss=loss,
        loss_unscaled=loss_unscaled,
        g_norm=jnp.sum(jnp.where(good, g_norm, 0.0)) / n_good,
        tangent_norm=jnp.sum(jnp.where(good, tan_norm, 0.0)) / n_good,
        nan_frac=jnp.mean(bad.astype(jnp.float32)),
        nan_count=jnp.sum(bad.astype(jnp.int32)),
        **extra,
    )
    return loss, metrics


def scm_trigflow_loss(
    fn,
    jvp_fn,
    teacher_fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    uncond: Any = None,
    guidance=1.0,
    step=0,
    tangent_warmup=0,
    p_mean: float = -0.8,
    p_std: float = 1.6,
    t: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 100.0,
    normalise: bool = True,
):
    """sCM loss in TrigFlow form (bidirectional student, RF networks wrapped by ``trigflow_predict``).

    ``t ~ LogNormal-sigma(p_mean, p_std)`` in RF time (or given ``[B]`` / ``[B, T]``), ``s = arctan(t/(1-t))``,
    ``x_s = cos s x0 + sin s eps``. With ``F_T`` the guided teacher's TrigFlow velocity
    (``F_u + w (F_c - F_u)``) and ``F^-`` the student's (stop-gradient)::

        dF    = jvp(F_jvp_fn, (x_s, s), (cos s sin s F_T, cos s sin s))     # = cos s sin s dF^-/ds
        r     = min(1, step / tangent_warmup)                                (1 if tangent_warmup == 0)
        g     = -cos s sqrt(1 - r^2 sin^2 s) (F^- - F_T) - (r cos s sin s x_s + dF)
        g_hat = g / (||g||_2 + 0.1)                                           (per sample)
        L     = loss_scale * mean_b sum (F_theta - sg(F_theta) - g_hat)^2     (loss_scale = 100)

    ``F_theta`` comes from ``fn`` (gradient forward), ``dF`` from ``jvp_fn`` (stop-gradient params).

    Args:
      fn, jvp_fn: student RF velocity network (grad forward / stop-gradient jvp copy).
      teacher_fn: teacher RF velocity network (outputs are stop-gradiented).
      x0: data ``[B, ...]``; cond / uncond / guidance: CFG of the teacher.
      key: PRNG key; step, tangent_warmup: warm-up (traceable step).
      normalise: per-sample ``g_hat = g / (||g|| + 0.1)`` (docs/design.md); False: ``g_hat = g`` (ablation).
    Returns:
      ``(loss, metrics)`` with ``loss, loss_unscaled, g_norm (mean ||g|| before normalisation),
      tangent_norm (mean ||dF||), nan_frac, nan_count, t_mean``.
    """
    x0 = C.check_x(x0)
    C.check_conds(x0, cond, uncond, guidance)
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, x0, k_t, D.lognormal_sampler(p_mean, p_std), dt)
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    s = D.rf_to_trig(t)
    sb = D.expand_time(s, x0)
    cos_s, sin_s = jnp.cos(sb), jnp.sin(sb)
    x_s = cos_s * x0 + sin_s * eps

    teacher = D.guided(teacher_fn, uncond, guidance)
    F_T = sg(D.trigflow_predict(teacher, x_s, s, cond)[1].astype(dt))

    cs = jnp.cos(s) * jnp.sin(s)
    _, dF = C.jvp_time_derivative(D.trigflow_fn(jvp_fn), x_s, s, cond, D.expand_time(cs, x0) * F_T, cs)
    dF = sg(dF.astype(dt))

    F_theta = D.trigflow_predict(fn, x_s, s, cond)[1].astype(dt)
    F_sg = sg(F_theta)
    r = C.warmup_ratio(step, tangent_warmup).astype(dt)
    g = -cos_s * jnp.sqrt(1.0 - r**2 * sin_s**2) * (F_sg - F_T) - (r * cos_s * sin_s * x_s + dF)
    return _finish(F_theta, F_sg, g, dF, loss_scale, dict(t_mean=jnp.mean(t), warmup_ratio=r), normalise)


def scm_rf_loss(
    fn,
    jvp_fn,
    teacher_fn,
    x0: Array,
    cond: Any,
    key: Array,
    *,
    uncond: Any = None,
    guidance=1.0,
    step=0,
    tangent_warmup=0,
    teacher_forcing: bool = True,
    p_mean: float = -0.8,
    p_std: float = 1.6,
    t: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 100.0,
    normalise: bool = True,
):
    """sCM loss in RF form; with ``teacher_forcing=True`` (default) this is TF-sCM on packed sequences.

    ``t ~ LogNormal-sigma(p_mean, p_std)`` per sample (or given ``[B]`` / ``[B, T]``),
    ``x_t = (1 - t) x0 + t eps``. Teacher forcing packs ``x_p = [x0 | x_t]``, ``t_p = [0 | t]`` along the
    frame axis (``[B, 2T, ...]``, ``[B, 2T]``); teacher, student and jvp pass all see the packed sequence
    and only the noisy half ``[:, T:]`` of their outputs is used. The tangent is
    ``(dx_p, dt_p) = ([0 | v_T], [0 | 1])``: the clean-context tangents are exactly zero::

        v_T   = guided teacher velocity (noisy half)
        dv    = jvp(jvp_fn, (x_p, t_p), ([0 | v_T], [0 | 1]))[:, T:]        # = d v^- / dt along the ODE
        r     = min(1, step / tangent_warmup)
        g     = -(v^- - v_T) - r t dv
        g_hat = g / (||g||_2 + 0.1)                                         (per sample)
        L     = loss_scale * mean_b sum (v_theta - sg(v_theta) - g_hat)^2   (loss_scale = 100)

    With ``teacher_forcing=False`` the same formulas run on unpacked ``x_t`` (bidirectional RF sCM).
    The student's prediction is ``x0_hat = x_t - t v_theta``.

    Args:
      fn, jvp_fn: student velocity network (grad forward / stop-gradient jvp copy), packed I/O for TF.
      teacher_fn: teacher velocity network (causal TF teacher for TF), outputs stop-gradiented.
      x0: clean video ``[B, T, ...]`` (``[B, ...]`` allowed when ``teacher_forcing=False``).
      normalise: as :func:`scm_trigflow_loss`.
    Returns:
      ``(loss, metrics)`` as :func:`scm_trigflow_loss`.
    """
    x0 = C.check_x(x0, min_ndim=2 if teacher_forcing else 1)
    C.check_conds(x0, cond, uncond, guidance)
    dt = D.compute_dtype(x0)
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, x0, k_t, D.lognormal_sampler(p_mean, p_std), dt)
    eps = C.get_noise(noise, x0, k_n, dt)
    x0 = x0.astype(dt)
    x_t = D.rf_noise(x0, eps, t)
    tb = D.expand_time(t, x0)
    teacher = D.guided(teacher_fn, uncond, guidance)

    if teacher_forcing:
        T = x0.shape[1]
        x_in, t_in = D.pack_teacher_forcing(x0, x_t, t)
        v_T = sg(D.unpack_noisy(D.call_net(teacher, x_in, t_in, cond), T).astype(dt))
        dx_in = jnp.concatenate([jnp.zeros_like(x0), v_T], axis=1)
        dt_in = jnp.concatenate([jnp.zeros_like(t_in[:, :T]), jnp.ones_like(t_in[:, T:])], axis=1)
        _, dv = C.jvp_time_derivative(jvp_fn, x_in, t_in, cond, dx_in, dt_in)
        dv = sg(D.unpack_noisy(dv, T).astype(dt))
        v_theta = D.unpack_noisy(D.call_net(fn, x_in, t_in, cond), T).astype(dt)
    else:
        v_T = sg(D.call_net(teacher, x_t, t, cond).astype(dt))
        _, dv = C.jvp_time_derivative(jvp_fn, x_t, t, cond, v_T)
        dv = sg(dv.astype(dt))
        v_theta = D.call_net(fn, x_t, t, cond).astype(dt)

    v_sg = sg(v_theta)
    r = C.warmup_ratio(step, tangent_warmup).astype(dt)
    g = -(v_sg - v_T) - r * tb * dv
    return _finish(v_theta, v_sg, g, dv, loss_scale, dict(t_mean=jnp.mean(t), warmup_ratio=r), normalise)
