"""Sample videos of a model in training, written to `workdir/samples/` (the loop's sample hook)."""

from __future__ import annotations

import os

import jax
import numpy as np

from crm_jax import diffusion as D
from crm_jax.data.toy_source import ToySource
from crm_jax.models import adapter
from crm_jax.models.wan import AttentionPattern


def generate_sample(apply, params, mcfg, batch: dict, *, pattern: AttentionPattern, method: str, steps: int, key):
    """A video `[n, T, H, W, C]` for the first rows of `batch` (latents, context, optional actions).

    A causal `pattern` is given the batch's first block and actions and generates the rest
    (`sampling.causal.causal_sample` with `method` and `steps`); the "full" pattern generates
    the whole clip with `steps`-step Euler from noise."""
    from crm_jax.sampling.causal import causal_sample

    lat, ctx, acts = batch["latents"], batch["context"], batch.get("actions")
    if pattern.kind == "full":
        fn = adapter.velocity_fn(apply, params, pattern)
        cond = {"context": ctx} if acts is None else {"context": ctx, "actions": acts}
        return D.euler_sample(fn, jax.random.normal(jax.random.key(0), lat.shape), cond, num_steps=steps)
    return causal_sample(
        apply,
        params,
        mcfg,
        key,
        ctx,
        pattern=pattern,
        num_frames=lat.shape[1],
        latent_hw=lat.shape[2:4],
        method=method,
        steps=steps,
        actions=acts,
        prefix=lat[:, : pattern.first],
    )


def write_sample(
    workdir: str, iteration: int, apply, params, mcfg, src, *, pattern, method: str, steps: int, rows: int = 2
) -> str:
    """A sample of the current model on a held-out batch of `src`, as `workdir/samples/iter_N.gif`
    (truth | sample, toy world) or `.npz` latents (other sources). Returns the path."""
    batch = src.batch(10**6)
    batch = {k: (None if v is None else v[:rows]) for k, v in batch.items() if k in ("latents", "context", "actions")}
    x = generate_sample(
        apply, params, mcfg, batch, pattern=pattern, method=method, steps=steps, key=jax.random.key(iteration)
    )
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    if isinstance(src, ToySource):
        from crm_jax.data.toy_latents import latents_to_frames
        from crm_jax.sampling.video import VideoWriter

        lat = batch["latents"]
        frames = np.concatenate(
            [np.asarray(latents_to_frames(lat, src.factor)), np.asarray(latents_to_frames(x, src.factor))], axis=2
        )  # truth | sample
        path = os.path.join(workdir, "samples", f"iter_{iteration:07d}.gif")
        with VideoWriter(path, fps=4) as w:
            w.append(frames[0])
        return path
    path = os.path.join(workdir, "samples", f"iter_{iteration:07d}.npz")
    np.savez(path, latents=np.asarray(x))
    return path
