"""Self-forcing rollout: the causal student generates its own video chunk by chunk.

Per block of frames (an `AttentionPattern` block), starting from noise at the
first time of the few-step grid, each step predicts x0_hat = x - t v and re-noises
to the next time with fresh noise. Only the **last** step of each block carries
gradients (earlier steps run on stop-gradient parameters and their outputs are
stop-gradiented). The block's context is then written to the KV cache:
  * ``clean``: x0_hat re-run at t = 0, which writes its keys (one extra forward),
  * ``noisy``: the cache is written during the last denoising step itself.
The cache is always stop-gradient, so each block's graph is independent of the
others' and the backward can be replayed block by block (`replayed_grad`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax.models.adapter import actions_for
from crm_jax.models.wan import AttentionPattern, KVCache

sg = jax.lax.stop_gradient
CONTEXT_MODES = ("clean", "noisy")


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Static description of a rollout: pattern, frames, step grid, context mode."""

    pattern: AttentionPattern
    num_frames: int
    times: tuple[float, ...]  # n + 1 decreasing RF times ending in 0
    context_mode: str = "clean"

    def __post_init__(self):
        if self.pattern.kind != "block_causal":
            raise ValueError(f"self-forcing needs a block_causal pattern, got {self.pattern.kind!r}")
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {self.context_mode!r}")
        ts = np.asarray(self.times)
        if ts.ndim != 1 or len(ts) < 2 or ts[-1] != 0 or np.any(np.diff(ts) >= 0):
            raise ValueError(f"times must be a decreasing grid ending at 0, got {self.times}")

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    def blocks(self) -> list[tuple[int, int]]:
        s = self.pattern.block_starts(self.num_frames) + [self.num_frames]
        return list(zip(s[:-1], s[1:]))


def _call(apply, params, x, t, cond, spec, cache, start):
    b, f = x.shape[:2]
    actions = cond.get("actions")
    a = None if actions is None else actions[:, start : start + f]
    return apply(
        params,
        x,
        jnp.full((b, f), t, x.dtype),
        cond["context"],
        pattern=spec.pattern,
        actions=actions_for(a, x),
        cache=cache,
        cache_frames=start,
    )


def _denoise_block(apply, params, x, cond, spec: RolloutSpec, cache, start, keys):
    """Few-step denoising of one block; returns (x0_hat, inputs of the last step, cache)."""
    ts = spec.times
    n = spec.num_steps
    for j in range(n - 1):
        v, _ = _call(apply, sg(params), x, ts[j], cond, spec, cache, start)
        x0 = sg(x - ts[j] * v)
        eps = jax.random.normal(keys[j], x.shape, x.dtype)
        x = sg((1 - ts[j + 1]) * x0 + ts[j + 1] * eps)
    write = spec.context_mode == "noisy"
    v, new_cache = _call(apply, params, x, ts[n - 1], cond, spec, cache, start)
    x0 = x - ts[n - 1] * v
    return x0, x, new_cache if write else cache


def _write_context(apply, params, x0, cond, spec, cache, start):
    _, cache = _call(apply, sg(params), sg(x0), 0.0, cond, spec, cache, start)
    return cache


def empty_cache(cfg, batch: int, spec: RolloutSpec, tokens_per_frame: int, dtype=None) -> KVCache:
    return KVCache.create(cfg, batch, spec.num_frames, tokens_per_frame, dtype)


def rollout(apply, params, noise, cond, key, spec: RolloutSpec, cache: KVCache):
    """Generate `G [B, F, H, W, C]` from `noise` (same shape) block by block.

    Gradients w.r.t. `params` flow only through each block's last denoising step.
    Returns (G, last_inputs) where `last_inputs[i] = (x_in, cache_before)` of block i
    (what `replayed_grad` needs to redo that block's last step).
    """
    keys = jax.random.split(key, len(spec.blocks()) * max(spec.num_steps - 1, 1))
    keys = keys.reshape(len(spec.blocks()), max(spec.num_steps - 1, 1), *keys.shape[1:])
    outs, last = [], []
    for i, (s, e) in enumerate(spec.blocks()):
        cache_before = cache
        x0, x_last, cache = _denoise_block(apply, params, noise[:, s:e], cond, spec, cache, s, keys[i])
        last.append((x_last, cache_before))
        outs.append(x0)
        if spec.context_mode == "clean":
            cache = _write_context(apply, params, x0, cond, spec, cache, s)
    return jnp.concatenate(outs, axis=1), last


def replayed_grad(apply, params, last_inputs, cotangent, cond, spec: RolloutSpec):
    """d<G, cotangent>/d params, recomputing one block's last step at a time.

    `cotangent [B, F, ...]` is dLoss/dG (G treated as a leaf). Memory holds one
    block's graph: each block's last step is re-run under `jax.vjp` and summed.
    Equals the gradient through `rollout` because all cross-block paths are stop-gradient.
    """
    t_last = spec.times[spec.num_steps - 1]
    total = jax.tree.map(jnp.zeros_like, params)
    for (s, e), (x_in, cache) in zip(spec.blocks(), last_inputs):

        def block_out(p, x_in=x_in, cache=cache, s=s):
            v, _ = _call(apply, p, x_in, t_last, cond, spec, cache, s)
            return x_in - t_last * v

        _, vjp = jax.vjp(block_out, params)
        (g,) = vjp(cotangent[:, s:e].astype(jnp.float32))
        total = jax.tree.map(jnp.add, total, g)
    return total
