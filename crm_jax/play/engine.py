"""The play page's world: per-session simulator episodes and chunk-by-chunk model rollouts.

A session starts from a fresh toy-world episode: its first block (2 frames, the episode's own
first actions) is shown as is and given to the model as clean context, as in the world-model
evaluation (`crm_jax.evaluation.world_model`). Every later chunk takes one action per frame;
the simulator advances with them (the ground truth) and the model generates the chunk's frames
from the clean frames before it.

Model rollouts keep a window of the last clean latent frames (the trained clip length less one
chunk, so attention offsets and RoPE positions stay inside what training showed) and run one
block-causal model call per denoising step over `[window | new chunk | padding]`: the window
frames at t = 0, the chunk at its denoising time, padding up to the clip length after it (never
attended by the chunk; the window's fill is traced, so each model compiles once). The keys of the
window are those a KV cache would hold, so within the clip length this is the cached causal
rollout of `crm_jax.sampling.causal`, and beyond it a sliding window, computed without cache
bookkeeping (the toy model is small: a clip of 8 frames is 128 tokens).

Students take `steps` consistency steps (x̂0 = x - t v, re-noise) on the few-step grid;
teachers take Euler steps on the shifted grid with classifier-free guidance against the empty
prompt (`ToySource.negative_context`), like the demo's teacher.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import diffusion as D
from crm_jax.data import toy_world as tw
from crm_jax.data.toy_latents import frames_to_latents, latents_to_frames
from crm_jax.data.toy_source import ToySource
from crm_jax.models.wan import AttentionPattern, functional

ACTION_IDS = {name: i for i, name in enumerate(tw.ACTION_NAMES)}


def demo_world() -> tw.ToyWorldConfig:
    """The toy world the demo's models are trained on (`configs/base.py`, `c.data`)."""
    from configs.base import base_config

    d = base_config("demo", "tiny").data
    return tw.ToyWorldConfig(
        num_frames=d.num_frames,
        height=d.height,
        width=d.width,
        num_sprites=d.num_sprites,
        sprite_size=d.sprite_size,
        action_speed=d.action_speed,
        max_speed=d.max_speed,
    )


def parse_action(name) -> int:
    """An action name ("up", case-insensitive) or id -> its id; ValueError for anything else."""
    if isinstance(name, bool):
        raise ValueError(f"unknown action {name!r}")
    if isinstance(name, int) and 0 <= name < tw.NUM_ACTIONS:
        return name
    if isinstance(name, str) and name.strip().lower() in ACTION_IDS:
        return ACTION_IDS[name.strip().lower()]
    raise ValueError(f"unknown action {name!r}; known: {' '.join(tw.ACTION_NAMES)} (or ids 0..{tw.NUM_ACTIONS - 1})")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a model is sampled per chunk: "consistency" (students) or "euler" + CFG (teachers)."""

    method: str = "consistency"
    steps: int = 1
    guidance: float = 1.0
    shift: float = 5.0
    sigma_max: float = 80.0

    def grid(self) -> np.ndarray:
        if self.method == "euler":
            return D.shifted_time_grid(self.steps, self.shift)
        return D.few_step_times(self.steps, self.sigma_max)


STUDENT = Sampling("consistency", 1)
TEACHER = Sampling("euler", 8, guidance=2.0)


class ModelRunner:
    """One loaded model and its jitted chunk function (one compile per window length)."""

    def __init__(self, model, sampling: Sampling, block: int = 2):
        self.cfg = model.cfg
        self.sampling = sampling
        self.block = block
        self.apply, self.params = functional(model)
        self._fn = _jitted_chunk(self.apply, sampling, block)

    def chunk(self, window, c: int, key, context, neg, actions) -> jax.Array:
        return self._fn(self.params, window, np.int32(c), key, context, neg, actions)


@functools.lru_cache(maxsize=16)
def _jitted_chunk(apply, sampling: Sampling, block: int):
    """The jitted chunk function of a model structure (`functional` shares `apply` between models of
    one architecture) and a sampling: a student and a teacher of the same size share compiles."""
    return jax.jit(functools.partial(_chunk, apply, sampling, block, tuple(float(t) for t in sampling.grid())))


def _chunk(apply, s: Sampling, f: int, ts: tuple, params, window, c, key, context, neg, actions):
    """One chunk after `c` clean frames. window `[1, W, h, w, C]`: the clean latents in frames [0, c),
    anything after; c: int32 (traced: one compile for every window fill); actions `[1, W]` with the
    chunk's at [c, c + f); context `[1, L, D]`; neg `[L, D]`. Returns the chunk's clean latents
    `[1, f, h, w, C]`.

    Each model call sees `[clean window | chunk | padding]` block-causally: the chunk (RoPE positions
    c, c + 1, ...) attends to the window and itself, never to the padding after it.
    """
    b, big_w, h, w, ch = window.shape
    pattern = AttentionPattern("block_causal", f)
    cfg_on = s.guidance != 1.0
    ctx = jnp.concatenate([context, neg[None]]) if cfg_on else context
    acts = jnp.concatenate([actions, actions]) if cfg_on else actions
    frame = jnp.arange(big_w)
    in_chunk = (frame >= c) & (frame < c + f)
    x = jax.random.normal(jax.random.fold_in(key, 0), (b, f, h, w, ch))
    for j in range(len(ts) - 1):
        xin = jax.lax.dynamic_update_slice_in_dim(window, x, c, axis=1)
        t = jnp.broadcast_to(jnp.where(in_chunk, ts[j], 0.0), (b, big_w))
        if cfg_on:
            xin, t = jnp.concatenate([xin, xin]), jnp.concatenate([t, t])
        v = apply(params, xin, t, ctx, pattern=pattern, actions=acts)
        v = jax.lax.dynamic_slice_in_dim(v[0] if isinstance(v, tuple) else v, c, f, axis=1)
        if cfg_on:
            v = v[b:] + s.guidance * (v[:b] - v[b:])
        if s.method == "euler":
            x = x + (ts[j + 1] - ts[j]) * v
        else:
            x0 = x - ts[j] * v
            eps = jax.random.normal(jax.random.fold_in(key, j + 1), x.shape)
            x = x0 if j == len(ts) - 2 else (1 - ts[j + 1]) * x0 + ts[j + 1] * eps
    return x


@functools.partial(jax.jit, static_argnames="world")
def _advance(state: tw.WorldState, actions, world: tw.ToyWorldConfig):
    def body(st, a):
        st = tw.step(st, a, world)
        return st, st.pos

    return jax.lax.scan(body, state, actions)


def _score(frames, states, colors, world: tw.ToyWorldConfig):
    """Per-frame trajectory error `[f]` (px, sprites fully visible in the truth; a sprite the
    detector misses costs the image diagonal) and the detected controlled-sprite centre of each
    frame `[f, 2]` (NaN where not found)."""
    return tw.drift_by_frame(frames, states, colors, world), tw.detect(frames, colors, world)[0][:, 0]


def to_uint8(frames) -> np.ndarray:
    return np.round(np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255).astype(np.uint8)


class Session:
    """One player's episode: simulator state, model window, action log, scores. Not thread-safe
    on its own: the server serialises calls with `lock`."""

    def __init__(self, sid: str, world: tw.ToyWorldConfig, runner: ModelRunner, which: str, seed: int, src: ToySource):
        self.id, self.world, self.src = sid, world, src
        self.lock = threading.Lock()
        self.touched = time.monotonic()
        self.first = self.reset(runner, which, seed)

    def reset(self, runner: ModelRunner, which: str, seed: int) -> dict:
        """A new episode from `seed`; returns its first block (the same frames for model and truth)."""
        w = self.world
        self.runner, self.which, self.seed = runner, which, seed
        key = jax.random.key(seed)
        ep = tw.sample_episode(key, w)
        self.key = jax.random.fold_in(key, 1)
        self.colors, self.scene = ep.colors, ep.scene
        self.context = self.src.embed_prompt(ep.prompt[None])
        self.neg = self.src.negative_context()
        block = runner.block
        first = np.asarray(ep.actions[:block], np.int32)
        self.state, states = _advance(ep.init_state, jnp.asarray(first), w)
        truth = tw.render(states, self.colors, self.scene, w)
        # The model's clean context: the last frames generated (at first the episode's first block).
        self.window = np.asarray(frames_to_latents(truth))[None]  # [1, c, h, w, C]
        self.actions = first.tolist()
        self.chunks = 0
        self.err_sum, self.err_frames = 0.0, 0
        self.model_s, self.model_frames = 0.0, 0
        first_frames = to_uint8(truth)
        return dict(model=first_frames, truth=first_frames, actions=self.actions)

    def switch(self, runner: ModelRunner, which: str):
        """Another model continues from the same clean window (its architecture must match)."""
        self.runner, self.which = runner, which

    def step(self, acts: list[int]) -> dict:
        """Advance one chunk with one action per frame. Returns frames and numbers for the page."""
        w, r = self.world, self.runner
        f = r.block
        if len(acts) == 1:
            acts = acts * f
        if len(acts) != f:
            raise ValueError(f"give 1 action or {f} (one per frame), got {len(acts)}")
        big_w = self.window_frames()
        window = self.window[:, -(big_w - f) :]  # at most W - f clean frames before the chunk
        c = window.shape[1]
        buf = np.zeros((1, big_w, *window.shape[2:]), np.float32)
        buf[:, :c] = window
        hist = np.zeros((1, big_w), np.int32)
        hist[0, : c + f] = (self.actions[-c:] if c else []) + acts
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.key, self.chunks)
        lat = np.asarray(r.chunk(buf, c, key, self.context, self.neg, hist))  # [1, f, h, w, C]
        frames = latents_to_frames(lat[0])  # [f, H, W, 3]
        dt = time.perf_counter() - t0
        self.state, states = _advance(self.state, jnp.asarray(acts, jnp.int32), w)
        truth = tw.render(states, self.colors, self.scene, w)
        err, pos = _score(frames, states, self.colors, w)
        err = np.asarray(err)
        self.window = np.concatenate([window, lat], axis=1)
        self.actions += list(acts)
        self.chunks += 1
        self.err_sum += float(err.sum())
        self.err_frames += len(err)
        self.model_s += dt
        self.model_frames += f
        return dict(
            model=to_uint8(frames),
            truth=to_uint8(truth),
            actions=list(acts),
            chunk_error=float(err.mean()),
            mean_error=self.err_sum / self.err_frames,
            model_fps=f / dt if dt > 0 else None,
            mean_model_fps=self.model_frames / self.model_s if self.model_s > 0 else None,
            truth_pos=np.asarray(states[:, 0]).tolist(),
            model_pos=[None if np.isnan(p).any() else p.tolist() for p in np.asarray(pos)],
        )

    def window_frames(self) -> int:
        """Frames the model sees per call: the trained clip length."""
        return self.world.num_frames
