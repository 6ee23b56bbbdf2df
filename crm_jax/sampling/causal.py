"""Block-by-block sampling of a causal model with a given clean prefix and CFG.

Used for teacher data generation (Euler ODE on a shifted grid with guidance) and
for world-model evaluation (the first frames are given, the rest are generated
from actions). Each block is denoised with the KV cache of the clean frames
before it, then its clean result is written to the cache at t = 0. Conditional
and unconditional branches run as one doubled batch with one doubled cache.

For throughput-oriented streaming of a distilled student use
`crm_jax.sampling.streaming.StreamingSampler` (no prefix/CFG, prefetching).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import diffusion as D
from crm_jax.models.wan import AttentionPattern, KVCache

METHODS = ("euler", "consistency")


@functools.cache
def _jit(apply):
    return jax.jit(apply, static_argnames=("pattern", "cache_frames", "ad"))


def block_times(method: str, steps: int, shift: float = 5.0, sigma_max: float = 80.0) -> np.ndarray:
    """The per-block time grid: shifted Euler grid or the few-step consistency grid."""
    if method == "euler":
        return D.shifted_time_grid(steps, shift)
    if method == "consistency":
        return D.few_step_times(steps, sigma_max)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def causal_sample(
    apply,
    params,
    cfg,
    key,
    context,
    *,
    pattern: AttentionPattern,
    num_frames: int,
    latent_hw,
    method: str = "euler",
    steps: int = 16,
    shift: float = 5.0,
    sigma_max: float = 80.0,
    guidance: float = 1.0,
    neg_context=None,
    actions=None,
    prefix=None,
    times=None,
    noise=None,
):
    """Generate `[B, num_frames, H, W, C]`.

    Args:
      apply, params, cfg: the functional model and its config.
      context: `[B, text_len, text_dim]`; neg_context `[text_len, text_dim]` for CFG (guidance != 1).
      pattern: block_causal pattern; `prefix [B, P, H, W, C]` (P a block boundary) is given clean.
      method: "euler" (x += dt v over a shifted grid, teacher) or "consistency" (x̂0 then
        re-noise with fresh noise on the few-step grid, distilled student).
      actions: optional `[B, num_frames]` int.
      times: explicit per-block grid (decreasing, ending at 0) instead of `method`'s default.
      noise: optional `[B, num_frames, H, W, C]` starting noise (else drawn from `key`, per block).

    A MeanFlow student (`cfg.mean_flow`) sampled by "consistency" is called with r = 0: its
    average velocity u(x, 0, t) over [0, t] gives x̂0 = x - t u directly.
    """
    if pattern.kind != "block_causal":
        raise ValueError(f"causal_sample needs a block_causal pattern, got {pattern.kind!r}")
    b = context.shape[0]
    h, w = latent_hw
    starts = pattern.block_starts(num_frames) + [num_frames]
    p = 0 if prefix is None else prefix.shape[1]
    if p and p not in starts:
        raise ValueError(f"prefix of {p} frames must end on a block boundary {starts}")
    cfg_on = guidance != 1.0
    if cfg_on and neg_context is None:
        raise ValueError("guidance != 1 needs neg_context")
    f = _jit(apply)
    ctx = jnp.concatenate([context, jnp.broadcast_to(neg_context, context.shape)]) if cfg_on else context
    acts = None if actions is None else (jnp.concatenate([actions, actions]) if cfg_on else actions)
    bb = ctx.shape[0]
    _, ph, pw = cfg.patch_size
    cache = KVCache.create(cfg, bb, num_frames, (h // ph) * (w // pw))
    ts = block_times(method, steps, shift, sigma_max) if times is None else np.asarray(times, np.float64)
    out = []
    for i, (s, e) in enumerate(zip(starts[:-1], starts[1:])):
        a = None if acts is None else acts[:, s:e]
        r = jnp.zeros((bb, e - s)) if cfg.mean_flow and method == "consistency" else None
        if s < p:
            x0 = prefix[:, s:e]
        else:
            kb = jax.random.fold_in(key if key is not None else jax.random.key(0), i)
            x = (
                jax.random.normal(kb, (b, e - s, h, w, cfg.in_channels))
                if noise is None
                else noise[:, s:e].astype(jnp.float32)
            )
            x0 = x
            for j in range(len(ts) - 1):
                xin = jnp.concatenate([x, x]) if cfg_on else x
                v, _ = f(
                    params,
                    xin,
                    jnp.full((bb, e - s), ts[j]),
                    ctx,
                    pattern=pattern,
                    actions=a,
                    r=r,
                    cache=cache,
                    cache_frames=s,
                )
                if cfg_on:
                    v = v[b:] + guidance * (v[:b] - v[b:])
                if method == "euler":
                    x = x + (ts[j + 1] - ts[j]) * v
                    x0 = x
                else:
                    x0 = x - ts[j] * v
                    if j < len(ts) - 2:
                        eps = jax.random.normal(jax.random.fold_in(kb, j + 1), x.shape)
                        x = (1 - ts[j + 1]) * x0 + ts[j + 1] * eps
        xin = jnp.concatenate([x0, x0]) if cfg_on else x0
        _, cache = f(
            params,
            xin,
            jnp.zeros((bb, e - s)),
            ctx,
            pattern=pattern,
            actions=a,
            r=r,
            cache=cache,
            cache_frames=s,
        )
        out.append(x0)
    return jnp.concatenate(out, axis=1)
