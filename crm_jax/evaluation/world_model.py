"""World-model rollouts of causal toy-world models, scored against the simulator.

A rollout is given the first `prefix_frames` ground-truth frames of a held-out episode
(a block boundary) and that episode's per-frame actions, and generates the remaining
frames block by block over the KV cache (`crm_jax.sampling.causal.causal_sample`). The
simulator's states of the same episode are the ground truth:

  trajectory_error   mean sprite-centre distance (px) over generated frames, sprites
                     fully visible in the truth; a sprite the detector cannot find costs
                     the image diagonal (`toy_world.trajectory_error`)
  action_following   fraction of transitions (from the last given frame on) where the
                     controlled sprite moves the way its action commands
  drift_by_frame     the trajectory error per generated frame index (`[T - prefix]`)
  background_error   mean absolute error (frames in [0, 1]) over the generated frames' pixels
                     that are background in the ground truth: how clean the scene stays
  fd                 Fréchet distance between the rollouts and the real clips in the
                     feature space of a separately trained video classifier (optional)

Long rollouts (beyond the trained length) use a sliding attention window
(`long_rollout_pattern`): every query then sees only frames at offsets the model saw
in training (RoPE is relative), while positions grow without bound.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax.data import toy_world as tw
from crm_jax.data.toy_latents import latents_to_frames
from crm_jax.data.toy_source import ToySource
from crm_jax.models.wan import AttentionPattern
from crm_jax.sampling.causal import causal_sample

# Held-out episodes come from their own PRNG stream (training batches use the data seed).
HELDOUT_SEED = 10_007


def heldout_source(
    world: tw.ToyWorldConfig, text_len: int, text_dim: int, episodes: int, seed: int = HELDOUT_SEED
) -> tuple[ToySource, dict]:
    """`episodes` held-out toy episodes: (source, batch with latents `[B, T, h, w, C]`, context
    `[B, L, D]`, actions `[B, T]`, states `[B, T, N, 2]`, colors `[B, N]`)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    src = ToySource(world, episodes, text_len, text_dim, seed=seed)
    return src, src.batch(0)


def long_rollout_pattern(pattern: AttentionPattern, trained_frames: int) -> AttentionPattern:
    """`pattern` with a sliding window covering `trained_frames` frames (own block included),
    so attention offsets never exceed what training showed (block-causal, equal blocks)."""
    if pattern.kind != "block_causal":
        raise ValueError(f"long rollouts need a block_causal pattern, got {pattern.kind!r}")
    if pattern.first != pattern.block_frames:
        raise ValueError("long_rollout_pattern needs equal blocks (first_block_frames == block_frames)")
    window = trained_frames // pattern.block_frames - 1
    if window < 1:
        raise ValueError(f"trained length {trained_frames} holds fewer than 2 blocks of {pattern.block_frames}")
    return dataclasses.replace(pattern, local_attn_blocks=window, sink_blocks=0)


@functools.partial(jax.jit, static_argnames=("world", "prefix"))
def _scores(frames, states, colors, actions, world: tw.ToyWorldConfig, prefix: int):
    gen, truth = frames[:, prefix:], states[:, prefix:]
    traj = jax.vmap(lambda f, s, c: tw.trajectory_error(f, s, c, world))(gen, truth, colors)
    drift = jax.vmap(lambda f, s, c: tw.drift_by_frame(f, s, c, world))(gen, truth, colors)
    start = max(prefix - 1, 0)
    follow = jax.vmap(lambda f, a, c: tw.action_following_accuracy(f, a, c, world))(
        frames[:, start:], actions[:, start:], colors
    )
    return traj, follow, drift


def score(frames, batch: dict, world: tw.ToyWorldConfig, prefix_frames: int, truth_frames=None) -> dict:
    """Per-episode scores of rollout `frames [B, T, H, W, 3]` in [0, 1] against `batch`'s truth.

    Returns numpy arrays: trajectory_error `[B]`, action_following `[B]`, drift `[B, T - prefix]`,
    and background_error `[B]` when the ground-truth frames `truth_frames [B, T, H, W, 3]` are given.
    With no prefix (a model that generates whole clips), trajectory_error / drift are NaN
    (the initial state is unknown to the model) and action following covers every transition.
    """
    frames = jnp.asarray(frames, jnp.float32)
    b, t = frames.shape[:2]
    if batch["states"].shape[:2] != (b, t):
        raise ValueError(
            f"frames {tuple(frames.shape)} do not match the episodes' states {tuple(batch['states'].shape)}"
        )
    if not 0 <= prefix_frames < t:
        raise ValueError(f"prefix_frames must be in [0, {t}), got {prefix_frames}")
    traj, follow, drift = _scores(frames, batch["states"], batch["colors"], batch["actions"], world, prefix_frames)
    traj, drift = np.asarray(traj), np.asarray(drift)
    if prefix_frames == 0:
        traj, drift = np.full_like(traj, np.nan), np.full_like(drift, np.nan)
    out = dict(trajectory_error=traj, action_following=np.asarray(follow), drift=drift)
    if truth_frames is not None:
        out["background_error"] = np.asarray(
            _background_error(frames, jnp.asarray(truth_frames), batch["states"], world, prefix_frames)
        )
    return out


@functools.partial(jax.jit, static_argnames=("world", "prefix"))
def _background_error(frames, truth, states, world: tw.ToyWorldConfig, prefix: int):
    """`[B]` mean |frames - truth| over generated frames' pixels not covered by a sprite in the truth."""
    covered = jax.vmap(lambda s: tw.sprite_masks(s, world).any(axis=1))(states[:, prefix:])  # [B, T', H, W]
    background = (~covered)[..., None].astype(jnp.float32)
    err = jnp.abs(frames[:, prefix:] - truth[:, prefix:]) * background
    return err.sum((1, 2, 3, 4)) / (background.sum((1, 2, 3, 4)) * frames.shape[-1])


@functools.cache
def _full_sampler(apply, steps: int, shift: float, guidance: float):
    from crm_jax import diffusion as D
    from crm_jax.models import adapter

    @jax.jit
    def sample(params, noise, context, actions, neg):
        fn = adapter.velocity_fn(apply, params, AttentionPattern("full"))
        cond = {"context": context, "actions": actions}
        uncond = None if guidance == 1.0 else adapter.uncond_like(cond, neg)
        return D.euler_sample(fn, noise, cond, num_steps=steps, shift=shift, uncond=uncond, guidance=guidance)

    return sample


def rollout(
    apply,
    params,
    mcfg,
    src: ToySource,
    batch: dict,
    key,
    *,
    pattern: AttentionPattern,
    prefix_frames: int,
    method: str,
    steps: int,
    guidance: float = 1.0,
    shift: float = 3.0,
    chunk_size: int = 256,
) -> jax.Array:
    """Generate latents `[B, T, h, w, C]` for the episodes of `batch`, `chunk_size` at a time.

    Causal models (block_causal `pattern`) get the first `prefix_frames` frames and generate
    the rest block by block; `method`/`steps`: "euler" (teachers: shifted grid, CFG `guidance`
    against the empty prompt) or "consistency" (few-step students). A bidirectional teacher
    (`pattern.kind == "full"`, no prefix, Euler) generates whole clips from the prompt and actions.
    """
    lat = batch["latents"]
    b, t = lat.shape[:2]
    if pattern.kind == "full":
        if prefix_frames or method != "euler":
            raise ValueError("a bidirectional (full) model generates whole clips: prefix_frames=0, method='euler'")
        sample = _full_sampler(apply, steps, float(shift), float(guidance))
        outs = []
        for i, s in enumerate(range(0, b, chunk_size)):
            sl = slice(s, min(s + chunk_size, b))
            noise = jax.random.normal(jax.random.fold_in(key, i), lat[sl].shape)
            outs.append(sample(params, noise, batch["context"][sl], batch["actions"][sl], src.negative_context()))
        return jnp.concatenate(outs)
    outs = []
    for i, s in enumerate(range(0, b, chunk_size)):
        sl = slice(s, min(s + chunk_size, b))
        outs.append(
            causal_sample(
                apply,
                params,
                mcfg,
                jax.random.fold_in(key, i),
                batch["context"][sl],
                pattern=pattern,
                num_frames=t,
                latent_hw=lat.shape[2:4],
                method=method,
                steps=steps,
                guidance=guidance,
                shift=shift,
                neg_context=src.negative_context() if guidance != 1.0 else None,
                actions=batch["actions"][sl],
                prefix=lat[sl, :prefix_frames] if prefix_frames else None,
            )
        )
    return jnp.concatenate(outs)


def evaluate(
    apply,
    params,
    mcfg,
    src: ToySource,
    batch: dict,
    key,
    *,
    pattern: AttentionPattern,
    prefix_frames: int,
    method: str,
    steps: int,
    guidance: float = 1.0,
    shift: float = 3.0,
    features=None,
    fd_window: int | None = None,
    keep_frames: int = 0,
) -> dict[str, Any]:
    """Roll out and score. Returns mean scores (floats), `drift_by_frame` (list), `fd` when
    `features` (a `video_features.FeatureModel`) is given -- on the last `fd_window` frames
    (default: the classifier's clip length) of rollouts and real clips -- `seconds`, and the
    first `keep_frames` rollouts as `frames [k, T, H, W, 3]` numpy (for pictures)."""
    t0 = time.perf_counter()
    lat = rollout(
        apply,
        params,
        mcfg,
        src,
        batch,
        key,
        pattern=pattern,
        prefix_frames=prefix_frames,
        method=method,
        steps=steps,
        guidance=guidance,
        shift=shift,
    )
    frames = latents_to_frames(lat, src.factor)
    jax.block_until_ready(frames)
    seconds = time.perf_counter() - t0
    truth = latents_to_frames(batch["latents"], src.factor)
    s = score(frames, batch, src.world, prefix_frames, truth_frames=truth)
    out = dict(
        trajectory_error=None if prefix_frames == 0 else float(np.mean(s["trajectory_error"])),
        action_following=float(np.mean(s["action_following"])),
        background_error=float(np.mean(s["background_error"])),
        drift_by_frame=None if prefix_frames == 0 else np.round(np.mean(s["drift"], 0), 4).tolist(),
        episodes=int(lat.shape[0]),
        seconds=round(seconds, 3),
    )
    if features is not None:
        w = features.clip_frames if fd_window is None else fd_window
        out["fd"] = float(features.frechet_distance(frames[:, -w:], truth[:, -w:]))
    if keep_frames:
        out["frames"] = np.asarray(frames[:keep_frames])
    return out
