"""Procedural, action-conditioned toy video world and its ground-truth scoring.

The world (all pure JAX: jit-, vmap- and scan-friendly, deterministic from a PRNG key):

* ``num_sprites`` axis-aligned squares of side ``sprite_size`` px, each a distinct pure
  colour from ``PALETTE`` (the colours are chosen per episode), on a background picked by
  a scene id (flat or a linear gradient; all background channels lie in [0.2, 0.6], far
  from the pure sprite colours).
* Sprite 0 is the *controlled* sprite: each frame it moves ``action_speed`` px in the
  direction of that frame's action (``STAY, UP, DOWN, LEFT, RIGHT``) and is **clamped**
  at the walls (an action into a wall moves it as far as the wall allows, possibly 0).
* Sprites 1.. move by their own integer velocity (each axis in ±[1, max_speed]) and
  **bounce** off the walls (mirror reflection of the position, velocity sign flipped).
* Z-order: lower index is drawn on top, so sprite 0 is never occluded; sprite i may be
  (partly or fully) hidden by sprites 0..i-1.
* Prompt: ``PROMPT_LEN`` = 2 integer tokens ``[scene_id, num_scenes + controlled colour
  id]`` (vocabulary size ``cfg.prompt_vocab_size``).

Coordinates: positions are sprite **centres** as float32 ``(x, y)``, x = column index,
y = row index, (0, 0) the top-left pixel; "up" decreases y. A sprite with centre c covers
the pixels ``round(c - (s - 1) / 2) .. + s - 1`` on each axis (s = sprite_size). Centres
always sit on the grid ``(s - 1) / 2 + integer`` (integers for odd s, half-integers for
even s) and inside ``[lo, hi] = [(s - 1) / 2, size - 1 - (s - 1) / 2]``, so the mean
pixel coordinate of a fully visible sprite equals its centre exactly.

Time convention: ``states[t] = step(states[t - 1], actions[t])`` with ``states[-1]`` the
initial state, i.e. frame t already shows the effect of action t.

Frames are float32 in [0, 1], shape ``[T, H, W, 3]`` (use ``2 * x - 1`` for [-1, 1]).

Scoring (independent of any model; vmap over a batch):
``detect`` (colour-threshold centroids), ``trajectory_error``, ``drift_by_frame``,
``action_following_accuracy``. Trajectory metrics only score (t, sprite) pairs that are
fully visible in the ground truth; a sprite the detector cannot find in a predicted frame
(no pixel of its colour, or only scattered ones) costs the image diagonal, so neither an
empty nor a noisy video scores well.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Action vocabulary.
STAY, UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3, 4
ACTION_NAMES = ("stay", "up", "down", "left", "right")
NUM_ACTIONS = len(ACTION_NAMES)
# (dx, dy) unit displacement per action.
ACTION_DELTAS = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], np.float32)

# Distinct pure sprite colours (RGB in [0, 1]).
PALETTE = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.0, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
)
PALETTE_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan")

# Scene backgrounds: (colour at start, colour at end, gradient axis: 0 none, 1 x, 2 y, 3 diag).
_SCENES = (
    ((0.30, 0.30, 0.30), (0.30, 0.30, 0.30), 0),  # flat grey
    ((0.20, 0.25, 0.45), (0.45, 0.35, 0.25), 1),  # horizontal gradient
    ((0.25, 0.45, 0.30), (0.40, 0.25, 0.50), 2),  # vertical gradient
    ((0.55, 0.50, 0.30), (0.25, 0.30, 0.55), 3),  # diagonal gradient
)
PROMPT_LEN = 2
_SNAP = 1e-3


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
    """Static world configuration (frozen, hashable: pass as a static jit argument)."""

    num_frames: int = 16
    height: int = 32
    width: int = 32
    num_sprites: int = 3
    sprite_size: int = 5
    action_speed: int = 2  # px/frame of the controlled sprite
    max_speed: int = 2  # max |v| per axis of the free sprites, px/frame
    num_scenes: int = 4  # <= len(_SCENES)
    action_repeat_prob: float = 0.75  # sampled actions repeat the previous one with this prob
    detect_tol: float = 0.3  # max per-channel |pixel - sprite colour| to count as sprite

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"ToyWorldConfig: {msg}")

        for name in (
            "num_frames",
            "height",
            "width",
            "num_sprites",
            "sprite_size",
            "action_speed",
            "max_speed",
            "num_scenes",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                bad(f"{name} must be a positive int, got {v!r}")
        if self.num_sprites > len(PALETTE):
            bad(f"num_sprites={self.num_sprites} exceeds palette size {len(PALETTE)}")
        if self.num_scenes > len(_SCENES):
            bad(f"num_scenes={self.num_scenes} exceeds {len(_SCENES)} available scenes")
        span = min(self.height, self.width) - self.sprite_size
        if span < 1:
            bad(f"sprite_size={self.sprite_size} must be smaller than the frame ({self.height}x{self.width})")
        if max(self.max_speed, self.action_speed) > span:
            bad(
                f"speeds (max_speed={self.max_speed}, action_speed={self.action_speed}) must "
                f"be <= frame size - sprite_size = {span}"
            )
        if not 0.0 <= self.action_repeat_prob <= 1.0:
            bad(f"action_repeat_prob must be in [0, 1], got {self.action_repeat_prob}")
        if not 0.0 < self.detect_tol < 0.5:
            bad(f"detect_tol must be in (0, 0.5), got {self.detect_tol}")

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def prompt_vocab_size(self) -> int:
        return self.num_scenes + len(PALETTE)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) float32 [2] (x, y) limits of sprite centres."""
        half = (self.sprite_size - 1) / 2
        lo = np.array([half, half], np.float32)
        hi = np.array([self.width - 1 - half, self.height - 1 - half], np.float32)
        return lo, hi


class WorldState(NamedTuple):
    """pos [N, 2] float32 centres (x, y); vel [N, 2] float32 px/frame (vel[0] unused)."""

    pos: jax.Array
    vel: jax.Array


class Episode(NamedTuple):
    """One episode (add a leading batch dim B for ``sample_batch``).

    actions [T] int32, prompt [P] int32, states [T, N, 2] float32 centres (x, y),
    colors [N] int32 palette ids, scene [] int32, init_state: WorldState before frame 0.
    """

    actions: jax.Array
    prompt: jax.Array
    states: jax.Array
    colors: jax.Array
    scene: jax.Array
    init_state: WorldState


# ----------------------------------------------------------------------------- checks


def _concrete(x):
    """np.ndarray of x, or None when x is being traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_actions(actions, cfg: ToyWorldConfig, name="actions"):
    actions = jnp.asarray(actions)
    if actions.ndim != 1:
        raise ValueError(f"{name} must have shape [T], got {actions.shape}")
    if not jnp.issubdtype(actions.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer action ids, got dtype {actions.dtype}")
    a = _concrete(actions)
    if a is not None and a.size and (a.min() < 0 or a.max() >= NUM_ACTIONS):
        bad = a[(a < 0) | (a >= NUM_ACTIONS)]
        raise ValueError(f"{name}: action id {int(bad[0])} out of vocabulary [0, {NUM_ACTIONS}) = {ACTION_NAMES}")
    return actions.astype(jnp.int32)


def _check_frames(frames, cfg: ToyWorldConfig, name="frames"):
    frames = jnp.asarray(frames)
    if frames.ndim != 4 or tuple(frames.shape[1:]) != cfg.frame_shape:
        raise ValueError(f"{name} must have shape [T, {cfg.height}, {cfg.width}, 3], got {tuple(frames.shape)}")
    return frames.astype(jnp.float32)


def _check_states(states, cfg: ToyWorldConfig, name="true_states"):
    states = jnp.asarray(states, jnp.float32)
    if states.ndim != 3 or tuple(states.shape[1:]) != (cfg.num_sprites, 2):
        raise ValueError(f"{name} must have shape [T, {cfg.num_sprites}, 2], got {tuple(states.shape)}")
    return states


def _check_colors(colors, cfg: ToyWorldConfig):
    colors = jnp.asarray(colors)
    if colors.shape != (cfg.num_sprites,) or not jnp.issubdtype(colors.dtype, jnp.integer):
        raise ValueError(
            f"colors must be int palette ids of shape [{cfg.num_sprites}], "
            f"got shape {tuple(colors.shape)} dtype {colors.dtype}"
        )
    c = _concrete(colors)
    if c is not None and (c.min() < 0 or c.max() >= len(PALETTE)):
        raise ValueError(f"colors: palette id out of range [0, {len(PALETTE)}): {c.tolist()}")
    return colors.astype(jnp.int32)


# ----------------------------------------------------------------------------- dynamics


def step(state: WorldState, action, cfg: ToyWorldConfig) -> WorldState:
    """Advance one frame. action: [] int32 (ids outside the vocabulary act as STAY)."""
    lo, hi = cfg.bounds
    valid = (action >= 0) & (action < NUM_ACTIONS)
    delta = jnp.where(valid, jnp.asarray(ACTION_DELTAS)[jnp.clip(action, 0, NUM_ACTIONS - 1)], 0.0)
    ctrl = jnp.clip(state.pos[0] + cfg.action_speed * delta, lo, hi)
    # Free sprites: move, mirror off the walls (one reflection suffices as speed <= span).
    p = state.pos[1:] + state.vel[1:]
    v = state.vel[1:]
    over_hi, under_lo = p > hi, p < lo
    p = jnp.where(over_hi, 2 * hi - p, jnp.where(under_lo, 2 * lo - p, p))
    v = jnp.where(over_hi | under_lo, -v, v)
    return WorldState(jnp.concatenate([ctrl[None], p]), state.vel.at[1:].set(v))


@functools.partial(jax.jit, static_argnames="cfg")
def _simulate(init_state: WorldState, actions, cfg: ToyWorldConfig) -> jax.Array:
    def body(state, a):
        state = step(state, a, cfg)
        return state, state.pos

    return jax.lax.scan(body, init_state, actions)[1]


def simulate(init_state: WorldState, actions, cfg: ToyWorldConfig) -> jax.Array:
    """Roll the ground truth: actions [T] int32 -> sprite centres [T, N, 2] float32.

    ``states[t] = step(states[t-1], actions[t])``, ``states[-1] = init_state``. Raises
    ValueError for bad shapes or (when not traced) action ids outside the vocabulary;
    under tracing such ids act as STAY.
    """
    actions = _check_actions(actions, cfg)
    pos = jnp.asarray(init_state.pos, jnp.float32)
    vel = jnp.asarray(init_state.vel, jnp.float32)
    if pos.shape != (cfg.num_sprites, 2) or vel.shape != (cfg.num_sprites, 2):
        raise ValueError(f"init_state pos/vel must have shape [{cfg.num_sprites}, 2], got {pos.shape} / {vel.shape}")
    return _simulate(WorldState(pos, vel), actions, cfg)


def _randint(u, n):
    """Uniform ints in [0, n) from uniforms u in [0, 1)."""
    return jnp.minimum(jnp.floor(u * n), n - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def sample_episode(key, cfg: ToyWorldConfig) -> Episode:
    """Sample one episode and roll it out: a uniform scene, distinct random colours,
    uniform on-grid initial centres, free-sprite velocities with each axis in
    ±[1, max_speed] (sprite 0: zero), and a "sticky" random action sequence (each action
    repeats the previous one with probability action_repeat_prob, else is uniform)."""
    n, s, t = cfg.num_sprites, cfg.sprite_size, cfg.num_frames
    # One uniform draw, carved up (a single threefry call keeps compile time low).
    sizes = (1, len(PALETTE), n, n, 2 * n, 2 * n, 1, t, t)
    u = jnp.split(jax.random.uniform(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    u_scene, u_col, u_x, u_y, u_sign, u_mag, u_a0, u_rep, u_new = u
    scene = _randint(u_scene[0], cfg.num_scenes)
    colors = jnp.argsort(u_col)[:n].astype(jnp.int32)
    pos = jnp.stack([_randint(u_x, cfg.width - s + 1), _randint(u_y, cfg.height - s + 1)], -1)
    pos = pos.astype(jnp.float32) + (s - 1) / 2
    vel = jnp.where(u_sign < 0.5, 1.0, -1.0) * (1 + _randint(u_mag, cfg.max_speed))
    init = WorldState(pos, vel.reshape(n, 2).at[0].set(0.0))

    def pick(prev, x):
        rep, new = x
        a = jnp.where(rep < cfg.action_repeat_prob, prev, _randint(new, NUM_ACTIONS))
        return a, a

    actions = jax.lax.scan(pick, _randint(u_a0[0], NUM_ACTIONS), (u_rep, u_new))[1]
    states = _simulate(init, actions, cfg)
    return Episode(actions, make_prompt(scene, colors[0], cfg), states, colors, scene, init)


def make_prompt(scene, controlled_color, cfg: ToyWorldConfig) -> jax.Array:
    """Prompt tokens [PROMPT_LEN] int32: [scene_id, num_scenes + controlled colour id]."""
    return jnp.stack([jnp.asarray(scene, jnp.int32), cfg.num_scenes + jnp.asarray(controlled_color, jnp.int32)])


# ----------------------------------------------------------------------------- rendering


@functools.cache
def _background_table(height: int, width: int, num_scenes: int) -> np.ndarray:
    """[num_scenes, H, W, 3] float32, computed once in numpy (identical under jit or not)."""
    u = np.broadcast_to(np.linspace(0.0, 1.0, width)[None, :], (height, width))
    v = np.broadcast_to(np.linspace(0.0, 1.0, height)[:, None], (height, width))
    weights = (np.zeros_like(u), u, v, (u + v) / 2)
    out = [
        np.asarray(c0) + (np.asarray(c1) - np.asarray(c0)) * weights[axis][..., None]
        for c0, c1, axis in _SCENES[:num_scenes]
    ]
    return np.stack(out).astype(np.float32)


def background(scene, cfg: ToyWorldConfig) -> jax.Array:
    """Background image [H, W, 3] float32 for scene id [] int32 (flat or linear gradient)."""
    return jnp.asarray(_background_table(cfg.height, cfg.width, cfg.num_scenes))[scene]


def sprite_masks(states, cfg: ToyWorldConfig) -> jax.Array:
    """Boolean coverage masks [T, N, H, W] of each sprite's square (ignoring occlusion)."""
    states = jnp.asarray(states, jnp.float32)
    x0 = jnp.round(states[..., 0] - (cfg.sprite_size - 1) / 2)[..., None]  # [T, N, 1]
    y0 = jnp.round(states[..., 1] - (cfg.sprite_size - 1) / 2)[..., None]
    xs = jnp.arange(cfg.width, dtype=jnp.float32)
    ys = jnp.arange(cfg.height, dtype=jnp.float32)
    in_x = (xs >= x0) & (xs < x0 + cfg.sprite_size)  # [T, N, W]
    in_y = (ys >= y0) & (ys < y0 + cfg.sprite_size)  # [T, N, H]
    return in_y[..., :, None] & in_x[..., None, :]


@functools.partial(jax.jit, static_argnames="cfg")
def _render(states, colors, scene, cfg: ToyWorldConfig) -> jax.Array:
    masks = sprite_masks(states, cfg)
    rgb = jnp.asarray(PALETTE, jnp.float32)[colors]  # [N, 3]
    frames = jnp.broadcast_to(background(scene, cfg), (states.shape[0],) + cfg.frame_shape)
    for i in reversed(range(cfg.num_sprites)):
        frames = jnp.where(masks[:, i, :, :, None], rgb[i], frames)
    return frames


def render(states, colors, scene, cfg: ToyWorldConfig) -> jax.Array:
    """Render frames [T, H, W, 3] float32 in [0, 1].

    states: [T, N, 2] centres (x, y); colors: [N] int32 palette ids; scene: [] int32.
    Sprite 0 is drawn on top (lower index occludes higher index); off-grid centres are
    rounded to the pixel grid.
    """
    states = _check_states(states, cfg, "states")
    colors = _check_colors(colors, cfg)
    return _render(states, colors, jnp.asarray(scene, jnp.int32), cfg)


def render_episode(ep: Episode, cfg: ToyWorldConfig) -> jax.Array:
    """Frames [T, H, W, 3] of one (unbatched) episode."""
    return render(ep.states, ep.colors, ep.scene, cfg)


@functools.partial(jax.jit, static_argnames=("batch_size", "cfg", "rows"))
def sample_batch(
    key, batch_size: int, cfg: ToyWorldConfig, rows: tuple[int, int] | None = None
) -> tuple[Episode, jax.Array]:
    """B independent episodes (episode i from ``jax.random.split(key, B)[i]``) and their
    frames: (Episode with a leading [B] on every field, frames [B, T, H, W, 3]).
    ``rows=(lo, hi)``: only episodes ``lo..hi-1`` of those B (leading dim ``hi - lo``)."""
    keys = jax.random.split(key, batch_size)
    if rows is not None:
        keys = keys[rows[0] : rows[1]]
    eps = jax.vmap(lambda k: sample_episode(k, cfg))(keys)
    frames = jax.vmap(lambda e: _render(e.states, e.colors, e.scene, cfg))(eps)
    return eps, frames


# ----------------------------------------------------------------------------- scoring


@functools.partial(jax.jit, static_argnames="cfg")
def _detect(frames, colors, cfg: ToyWorldConfig):
    rgb = jnp.asarray(PALETTE, jnp.float32)[colors]  # [N, 3]
    diff = jnp.abs(frames[:, None] - rgb[None, :, None, None, :])  # [T, N, H, W, 3]
    mask = (jnp.max(diff, axis=-1) < cfg.detect_tol).astype(jnp.float32)  # [T, N, H, W]
    count = mask.sum((-2, -1))
    xs = jnp.arange(cfg.width, dtype=jnp.float32)
    ys = jnp.arange(cfg.height, dtype=jnp.float32)
    sx = (mask.sum(-2) * xs).sum(-1)
    sy = (mask.sum(-1) * ys).sum(-1)
    denom = jnp.maximum(count, 1.0)[..., None]
    pos = jnp.stack([sx, sy], -1) / denom
    second = jnp.stack([(mask.sum(-2) * xs**2).sum(-1), (mask.sum(-1) * ys**2).sum(-1)], -1) / denom
    spread = jnp.sqrt(jnp.max(jnp.maximum(second - pos**2, 0.0), -1))  # [T, N] px
    # XLA may compute the division inside fusions with a few ulp of error; snap centroids
    # within _SNAP px of the half-pixel grid onto it so clean frames are recovered exactly.
    half = jnp.round(2 * pos) / 2
    pos = jnp.where(jnp.abs(pos - half) < _SNAP, half, pos)
    found = (count > 0) & (spread <= cfg.sprite_size / 2)
    pos = jnp.where(found[..., None], pos, jnp.nan)
    return pos, count / cfg.sprite_size**2


def detect(frames, colors, cfg: ToyWorldConfig) -> tuple[jax.Array, jax.Array]:
    """Recover sprite centres by colour.

    frames [T, H, W, 3] in [0, 1]; colors [N] palette ids. A pixel belongs to sprite i if
    every channel is within ``cfg.detect_tol`` of its colour. Returns
    ``(positions [T, N, 2] float32 (x, y) = mean coordinate of matching pixels, NaN where
    none or where they are scattered -- their coordinates' standard deviation exceeds
    sprite_size / 2 on an axis (a clean square has (s^2 - 1)^0.5 / 12^0.5; scattered noise
    pixels of a sprite's colour are not a sprite); coverage [T, N] float32 = matching pixel
    count / sprite_size**2)``.
    Exact (bit-for-bit) for every fully visible sprite of a clean rendered frame; for a
    partly occluded one it is the centroid of its visible part (coverage < 1). Centroids
    within 1e-3 px of a multiple of 0.5 are snapped onto it (cancels float rounding).
    """
    return _detect(_check_frames(frames, cfg), _check_colors(colors, cfg), cfg)


def visibility(states, cfg: ToyWorldConfig) -> jax.Array:
    """[T, N] bool: sprite fully visible (no overlap with any higher-z, lower-index sprite)."""
    states = _check_states(states, cfg, "states")
    d = jnp.abs(states[..., :, None, :] - states[..., None, :, :])  # [T, N, N, 2]
    overlap = jnp.all(d < cfg.sprite_size, axis=-1)  # squares on the grid overlap iff |d| < s
    above = jnp.tril(jnp.ones((cfg.num_sprites,) * 2, bool), k=-1)  # [i, j]: j < i
    return ~jnp.any(overlap & above, axis=-1)


@functools.partial(jax.jit, static_argnames="cfg")
def _errors_core(pred_frames, true_states, colors, cfg):
    pos, _ = _detect(pred_frames, colors, cfg)
    dist = jnp.sqrt(jnp.sum((pos - true_states) ** 2, -1))  # [T, N]
    dist = jnp.where(jnp.isnan(dist), float(np.hypot(cfg.height, cfg.width)), dist)
    return dist, visibility(true_states, cfg)


def _errors(pred_frames, true_states, colors, cfg):
    pred_frames = _check_frames(pred_frames, cfg, "pred_frames")
    true_states = _check_states(true_states, cfg)
    if pred_frames.shape[0] != true_states.shape[0]:
        raise ValueError(f"pred_frames has {pred_frames.shape[0]} frames but true_states has {true_states.shape[0]}")
    return _errors_core(pred_frames, true_states, _check_colors(colors, cfg), cfg)


def drift_by_frame(pred_frames, true_states, colors, cfg: ToyWorldConfig) -> jax.Array:
    """Mean centre distance (px) per frame [T] over sprites fully visible in the truth.

    pred_frames [T, H, W, 3]; true_states [T, N, 2]; colors [N]. An undetected sprite
    counts as the image diagonal. Sprite 0 is always visible, so no frame is empty.
    """
    dist, vis = _errors(pred_frames, true_states, colors, cfg)
    return jnp.sum(dist * vis, -1) / jnp.sum(vis, -1)


def trajectory_error(pred_frames, true_states, colors, cfg: ToyWorldConfig) -> jax.Array:
    """Mean centre distance (px, scalar) over all (frame, sprite) pairs fully visible in
    the truth. Same inputs and conventions as ``drift_by_frame``; 0 on ground-truth frames."""
    dist, vis = _errors(pred_frames, true_states, colors, cfg)
    return jnp.sum(dist * vis) / jnp.sum(vis)


@functools.partial(jax.jit, static_argnames="cfg")
def _action_following(frames, actions, colors, cfg):
    ctrl = _detect(frames, colors, cfg)[0][:, 0]  # [T, 2]
    prev, cur = ctrl[:-1], ctrl[1:]
    lo, hi = cfg.bounds
    delta = jnp.asarray(ACTION_DELTAS)[jnp.clip(actions[1:], 0, NUM_ACTIONS - 1)]
    expected = jnp.clip(prev + cfg.action_speed * delta, lo, hi) - prev

    def sign(d):
        return jnp.where(d > 0.5, 1, jnp.where(d < -0.5, -1, 0))

    ok = jnp.all(sign(cur - prev) == sign(expected), -1)
    ok = ok & ~jnp.any(jnp.isnan(prev) | jnp.isnan(cur), -1)
    return jnp.mean(ok.astype(jnp.float32))


def action_following_accuracy(frames, actions, colors, cfg: ToyWorldConfig) -> jax.Array:
    """Fraction (scalar in [0, 1]) of transitions t-1 -> t, t = 1..T-1, where the detected
    controlled sprite (sprite 0) moves in the direction action t commands.

    frames [T, H, W, 3]; actions [T] int32; colors [N]. The expected displacement is the
    commanded one clamped at the walls from the previous detected position; a transition
    counts as followed when the per-axis sign of the detected displacement (with a 0.5 px
    dead zone) equals that of the expected one. A missing detection counts as a failure.
    Ground-truth frames score 1.
    """
    frames = _check_frames(frames, cfg)
    actions = _check_actions(actions, cfg)
    if actions.shape[0] != frames.shape[0]:
        raise ValueError(f"actions has {actions.shape[0]} entries but frames has {frames.shape[0]}")
    if frames.shape[0] < 2:
        raise ValueError("action_following_accuracy needs at least 2 frames")
    return _action_following(frames, actions, _check_colors(colors, cfg), cfg)
