"""Distribution matching distillation (DMD): generator loss and the critic (fake score) loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from crm_jax import diffusion as D
from crm_jax.losses import common as C

Array = jax.Array
sg = jax.lax.stop_gradient


def dmd_loss(
    G: Array,
    real_fn,
    fake_fn,
    cond: Any,
    key: Array,
    *,
    uncond: Any = None,
    guidance=1.0,
    sampler=None,
    t: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 1.0,
):
    """DMD generator loss on generator samples ``G`` (differentiable w.r.t. whatever produced ``G``).

    ``t_D ~ sampler`` (default UniformShift(5), per sample; or given ``[B]`` / ``[B, T]``),
    ``x = (1 - t) sg(G) + t eps``; all arithmetic in float32 (or wider)::

        x0_real = x - t v_real(x, t)          real score = guided teacher (``uncond``, ``guidance``)
        x0_fake = x - t v_fake(x, t)          fake score = critic, no guidance
        grad    = (x0_fake - x0_real) / max(mean_{non-batch} |G - x0_real|, 1e-5)   (per sample)
        L       = loss_scale * mean_b sum (G - sg(G - grad))^2          (dL/dG = 2 grad / B * loss_scale)

    The loss includes no 100 factor (``lambda`` of rCM is applied by :func:`rcm_loss`). Samples with a
    non-finite ``grad`` get ``grad = 0`` and are counted in ``nan_frac``. If ``fake_fn`` and ``real_fn``
    agree, ``grad`` and the gradient are exactly zero.

    Args:
      G: generator samples ``[B, ...]`` (e.g. a self-forcing rollout output).
      real_fn, fake_fn: RF velocity networks (outputs stop-gradiented).
    Returns:
      ``(loss, {"loss", "dmd_grad_norm" (mean per-sample L2), "dmd_grad_abs_mean", "normalizer_mean",
      "nan_frac", "t_mean"})``.
    """
    G = C.check_x(G, "G")
    C.check_conds(G, cond, uncond, guidance)
    dt = D.compute_dtype(G)
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, G, k_t, sampler or D.uniform_shift_sampler(5.0), dt)
    eps = C.get_noise(noise, G, k_n, dt)
    G32 = G.astype(dt)
    Gd = sg(G32)
    x = D.rf_noise(Gd, eps, t)
    x0_fake = sg(D.x0_from_v(x, t, D.call_net(fake_fn, x, t, cond).astype(dt)))
    x0_real = sg(D.x0_from_v(x, t, D.guided_velocity(real_fn, x, t, cond, uncond, guidance).astype(dt)))
    normalizer = jnp.maximum(C.mean_per_sample(jnp.abs(Gd - x0_real)), 1e-5)
    grad = (x0_fake - x0_real) / D.expand_time(normalizer, Gd)
    bad = C.bad_samples(grad)
    grad = sg(C.mask_samples(bad, grad))
    per = C.sum_per_sample(jnp.square(G32 - sg(G32 - grad)))
    loss = loss_scale * jnp.mean(per)
    return loss, C.scalar_metrics(
        loss=loss,
        dmd_grad_norm=jnp.mean(C.norm_per_sample(grad)),
        dmd_grad_abs_mean=jnp.mean(jnp.abs(grad)),
        normalizer_mean=jnp.mean(jnp.where(bad, 0.0, normalizer)),
        nan_frac=jnp.mean(bad.astype(jnp.float32)),
        t_mean=jnp.mean(t),
    )


def critic_loss(
    fake_fn,
    G: Array,
    cond: Any,
    key: Array,
    *,
    sampler=None,
    t: Array | None = None,
    noise: Array | None = None,
    loss_scale: float = 1.0,
):
    """Critic (fake score) flow-matching loss on detached generator samples.

    ``t ~ sampler`` (default UniformShift(5)), ``x_t = (1 - t) sg(G) + t eps``::

        L = loss_scale * mean_{b, all} (fake_fn(x_t, t) - (eps - sg(G)))^2

    No gradient reaches ``G``. Returns ``(loss, {"loss", "critic_loss", "t_mean"})``.
    """
    G = C.check_x(G, "G")
    C.check_conds(G, cond)
    dt = D.compute_dtype(G)
    k_t, k_n = jax.random.split(key)
    t = C.get_time(t, G, k_t, sampler or D.uniform_shift_sampler(5.0), dt)
    eps = C.get_noise(noise, G, k_n, dt)
    Gd = sg(G.astype(dt))
    x = D.rf_noise(Gd, eps, t)
    v = D.call_net(fake_fn, x, t, cond).astype(dt)
    mse = jnp.mean(jnp.square(v - (eps - Gd)))
    loss = loss_scale * mse
    return loss, C.scalar_metrics(loss=loss, critic_loss=mse, t_mean=jnp.mean(t))
