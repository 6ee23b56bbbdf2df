"""Non-streaming reference sampler: the streaming procedure without a KV cache.

For each chunk it runs the model on the full block-causal sequence of all frames so
far -- the context frames first (clean mode: their x̂0 at t = 0; noisy mode: the
input of their last denoising step at that step's time), then the chunk being
denoised -- with the pattern's own mask (local window and sinks included) and
absolute frame positions, and keeps the chunk's part of the output. The not yet
generated frames after the chunk are zero padding at t = 1: the block-causal mask
keeps them from influencing earlier frames, and one fixed-length sequence means
one compile for the whole video. The noise is
`streaming.chunk_noise`, so it must agree with `StreamingSampler` on the same key.
Cost grows quadratically with the length: use it for tests and debugging.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax.diffusion import rf_noise, x0_from_v
from crm_jax.models.config import WanConfig
from crm_jax.models.wan import AttentionPattern
from crm_jax.sampling.actions import ActionSource
from crm_jax.sampling.plan import CONTEXT_MODES, check_pattern, chunk_bounds, make_schedule
from crm_jax.sampling.streaming import chunk_noises, noise_count, padded_times


def _ref_step(apply, params, xs, ts, acts, context, x, times, noise, j, start, *, pattern):
    """Denoising step j of the chunk at frame `start` (both traced) inside the whole video.

    xs `[B, T, H, W, C]` / ts `[B, T]` / acts `[B, T]` hold the context frames before
    `start` (the rest is padding); x `[B, f, H, W, C]` is the chunk at RF time times[j];
    noise `[S, B, f, H, W, C]` from `chunk_noises`. Returns (x̂0, x̂0 re-noised to times[j+1]).
    """
    b, f = x.shape[:2]
    zero = jnp.int32(0)
    t = jnp.full((b, f), times[j], jnp.float32)
    xs = jax.lax.dynamic_update_slice(xs, x, (zero, start, zero, zero, zero))
    ts = jax.lax.dynamic_update_slice(ts, t, (zero, start))
    v = apply(
        params, xs, ts, context, pattern=pattern, actions=acts, frame_pos=jnp.arange(xs.shape[1], dtype=jnp.int32)
    )
    v = jax.lax.dynamic_slice_in_dim(v, start, f, axis=1)
    x0 = x0_from_v(x, t, v)
    return x0, rf_noise(x0, noise[j + 1], jnp.full((b, f), times[j + 1], jnp.float32))


def _ref_commit(xs, ts, x, t, start):
    """Store a finished chunk's context frames x `[B, f, ...]` at time t `[]` into xs/ts."""
    zero = jnp.int32(0)
    xs = jax.lax.dynamic_update_slice(xs, x, (zero, start, zero, zero, zero))
    ts = jax.lax.dynamic_update_slice(ts, jnp.full(x.shape[:2], t, jnp.float32), (zero, start))
    return xs, ts


_commit = jax.jit(_ref_commit)


@functools.lru_cache(maxsize=8)
def _jitted(apply):
    return jax.jit(functools.partial(_ref_step, apply), static_argnames=("pattern",))


def reference_generate(
    apply,
    params,
    cfg: WanConfig,
    key,
    context,
    num_frames: int,
    *,
    pattern: AttentionPattern,
    latent_hw,
    steps=4,
    context_mode: str = "clean",
    actions=None,
) -> jax.Array:
    """Generate `[B, num_frames, H, W, C]` without a cache (see the module docstring).

    Arguments mean what they mean for `StreamingSampler` / `StreamingSampler.stream`.
    """
    check_pattern(pattern)
    if context_mode not in CONTEXT_MODES:
        raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {context_mode!r}")
    if num_frames is None or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    schedule = make_schedule(steps)
    context = jnp.asarray(context)
    b = context.shape[0]
    src = ActionSource(actions, b, cfg.num_actions)
    src.check_length(num_frames)
    step = _jitted(apply)
    xs = jnp.zeros((b, num_frames, *latent_hw, cfg.in_channels), jnp.float32)
    ts = jnp.ones((b, num_frames), jnp.float32)  # padding: pure noise level
    acts = None if src.array is None and not src.live else np.zeros((b, num_frames), np.int32)
    outs = []
    for i, (s, e) in enumerate(chunk_bounds(pattern, num_frames)):
        shape = (b, e - s, *latent_hw, cfg.in_channels)
        a = src.get(i, s, e)
        if a is not None:
            acts[:, s:e] = a
        times, n = padded_times(schedule, i)
        times = jnp.asarray(times)
        noise = chunk_noises(key, jnp.int32(i), shape, noise_count(schedule))
        x = noise[0]
        a_dev = None if acts is None else jnp.asarray(acts)
        for j in range(n):
            x0, x_next = step(
                params, xs, ts, a_dev, context, x, times, noise, jnp.int32(j), jnp.int32(s), pattern=pattern
            )
            if j < n - 1:
                x = x_next
        if context_mode == "clean":
            xs, ts = _commit(xs, ts, x0, jnp.float32(0.0), jnp.int32(s))
        else:
            xs, ts = _commit(xs, ts, x, times[n - 1], jnp.int32(s))
        outs.append(x0)
    return jnp.concatenate(outs, axis=1)
