"""Toy world: determinism, exact detection, action semantics, bouncing, metrics, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax.data import toy_world as tw

CFG = tw.ToyWorldConfig()  # 16 frames, 32x32, 3 sprites of 5 px, speed 2
B = 8


@functools.partial(jax.jit, static_argnames="cfg")
def _detect(frames, colors, cfg):
    return jax.vmap(lambda f, c: tw.detect(f, c, cfg))(frames, colors)


@functools.partial(jax.jit, static_argnames="cfg")
def _metrics(frames, states, actions, colors, cfg):
    return jax.vmap(
        lambda f, s, a, c: (
            tw.trajectory_error(f, s, c, cfg),
            tw.drift_by_frame(f, s, c, cfg),
            tw.action_following_accuracy(f, a, c, cfg),
        )
    )(frames, states, actions, colors)


@functools.partial(jax.jit, static_argnames="cfg")
def _render(states, colors, scene, cfg):
    return jax.vmap(lambda s, c, z: tw.render(s, c, z, cfg))(states, colors, scene)


@pytest.fixture(scope="module")
def batch():
    return tw.sample_batch(jax.random.key(0), B, CFG)


def _state(pos, vel=None, n=CFG.num_sprites):
    pos = jnp.asarray(pos, jnp.float32)
    vel = jnp.zeros((n, 2)) if vel is None else jnp.asarray(vel, jnp.float32)
    return tw.WorldState(pos, vel)


def test_shapes_dtypes_and_prompt(batch):
    ep, frames = batch
    T, N = CFG.num_frames, CFG.num_sprites
    assert frames.shape == (B, T, 32, 32, 3) and frames.dtype == jnp.float32
    assert float(frames.min()) >= 0.0 and float(frames.max()) <= 1.0
    assert ep.actions.shape == (B, T) and ep.actions.dtype == jnp.int32
    assert ep.states.shape == (B, T, N, 2) and ep.prompt.shape == (B, tw.PROMPT_LEN)
    np.testing.assert_array_equal(ep.prompt[:, 0], ep.scene)
    np.testing.assert_array_equal(ep.prompt[:, 1], CFG.num_scenes + ep.colors[:, 0])
    assert int(ep.prompt.max()) < CFG.prompt_vocab_size
    for c in np.asarray(ep.colors):  # distinct colours per episode
        assert len(set(c.tolist())) == N
    hash(CFG)  # static-arg usable


def test_deterministic_per_key(batch):
    ep, frames = batch
    ep2, frames2 = tw.sample_batch(jax.random.key(0), B, CFG)
    np.testing.assert_array_equal(frames, frames2)
    np.testing.assert_array_equal(ep.actions, ep2.actions)
    _, frames3 = tw.sample_batch(jax.random.key(1), B, CFG)
    assert not np.array_equal(frames, frames3)
    # Episodes within a batch differ from each other too.
    assert not np.array_equal(frames[0], frames[1])
    # Unbatched path agrees with the batched one (episode i uses split(key, B)[i]).
    e0 = tw.sample_episode(jax.random.split(jax.random.key(0), B)[0], CFG)
    np.testing.assert_array_equal(tw.render_episode(e0, CFG), frames[0])


def test_detector_exact_on_clean_frames(batch):
    ep, frames = batch
    pos, cov = _detect(frames, ep.colors, CFG)
    vis = jax.vmap(lambda s: tw.visibility(s, CFG))(ep.states)
    vis = np.asarray(vis)
    assert vis[..., 0].all()  # the controlled sprite is on top, always visible
    assert 0 < vis.mean() < 1 or vis.all()
    np.testing.assert_array_equal(np.asarray(pos)[vis], np.asarray(ep.states)[vis])
    np.testing.assert_array_equal(np.asarray(cov)[vis], 1.0)
    assert (np.asarray(cov)[~vis] < 1).all()


@pytest.mark.parametrize(
    "cfg",
    [
        tw.ToyWorldConfig(height=64, width=64, sprite_size=6, num_frames=4),  # half-integer centres
        tw.ToyWorldConfig(height=24, width=40, sprite_size=4, num_frames=4),  # non-square frame
    ],
)
def test_detector_exact_other_configs(cfg):
    ep, frames = tw.sample_batch(jax.random.key(7), 4, cfg)
    assert frames.shape == (4, 4, cfg.height, cfg.width, 3)
    pos, _ = _detect(frames, ep.colors, cfg)
    vis = np.asarray(jax.vmap(lambda s: tw.visibility(s, cfg))(ep.states))
    np.testing.assert_array_equal(np.asarray(pos)[vis], np.asarray(ep.states)[vis])
    if cfg.sprite_size % 2 == 0:
        assert np.all(np.asarray(ep.states) % 1 == 0.5)


def test_rendering_geometry_and_occlusion():
    # Sprite 0 centre (10, 4): covers columns 8..12 and rows 2..6.
    states = jnp.array(
        [
            [[10.0, 4.0], [12.0, 5.0], [24.0, 24.0]],  # 1 partly under 0
            [[10.0, 4.0], [10.0, 4.0], [24.0, 24.0]],
        ]
    )  # 1 fully under 0
    colors = jnp.array([0, 1, 2])
    frames = tw.render(states, colors, 0, CFG)
    red = np.all(np.asarray(frames[1]) == np.array(tw.PALETTE[0]), -1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 12, 2, 6) and red.sum() == 25
    pos, cov = tw.detect(frames, colors, CFG)
    np.testing.assert_array_equal(pos[:, 0], states[:, 0])
    np.testing.assert_array_equal(pos[:, 2], states[:, 2])
    assert 0 < float(cov[0, 1]) < 1  # partly occluded: only visible part seen
    assert np.isnan(np.asarray(pos[1, 1])).all() and float(cov[1, 1]) == 0.0  # hidden: NaN
    np.testing.assert_array_equal(tw.visibility(states, CFG), [[True, False, True], [True, False, True]])


def test_actions_move_controlled_sprite_as_specified():
    s = CFG.action_speed
    init = _state([[15.0, 15.0], [4.0, 4.0], [27.0, 27.0]], [[0, 0], [1, 0], [0, -1]])
    acts = jnp.array([tw.UP, tw.DOWN, tw.DOWN, tw.LEFT, tw.RIGHT, tw.RIGHT, tw.STAY])
    states = np.asarray(tw.simulate(init, acts, CFG))
    ctrl = np.concatenate([[[15.0, 15.0]], states[:, 0]])
    np.testing.assert_array_equal(np.diff(ctrl, axis=0), [[0, -s], [0, s], [0, s], [-s, 0], [s, 0], [s, 0], [0, 0]])
    # Free sprites ignore the actions: same rollout under all-STAY.
    stay = np.asarray(tw.simulate(init, jnp.zeros_like(acts), CFG))
    np.testing.assert_array_equal(states[:, 1:], stay[:, 1:])
    np.testing.assert_array_equal(states[:, 1, 0], 4.0 + np.arange(1, 8))


def test_walls_clamp_controlled_sprite():
    lo, hi = CFG.bounds  # centres in [2, 29] for 32 px and 5 px sprites
    init = _state([[lo[0], lo[1] + 1], [15.0, 15.0], [20.0, 20.0]])
    acts = jnp.array([tw.UP, tw.UP, tw.LEFT, tw.RIGHT] + [tw.RIGHT] * 14)
    states = np.asarray(tw.simulate(init, acts, CFG))
    np.testing.assert_array_equal(states[0, 0], [lo[0], lo[1]])  # 1 px left to the wall
    np.testing.assert_array_equal(states[1, 0], [lo[0], lo[1]])  # pushing into it: no move
    np.testing.assert_array_equal(states[2, 0], [lo[0], lo[1]])
    np.testing.assert_array_equal(states[-1, 0], [hi[0], lo[1]])  # clamped at the right wall


def test_bouncing_reflects_and_stays_in_bounds():
    lo, hi = CFG.bounds
    init = _state([[15.0, 15.0], [hi[0] - 1, 10.0], [10.0, lo[1]]], [[0, 0], [2, 1], [-1, -2]])
    states = np.asarray(tw.simulate(init, jnp.zeros(3, jnp.int32), CFG))
    np.testing.assert_array_equal(states[:, 1], [[hi[0] - 1, 11], [hi[0] - 3, 12], [hi[0] - 5, 13]])
    np.testing.assert_array_equal(states[:, 2], [[9, lo[1] + 2], [8, lo[1] + 4], [7, lo[1] + 6]])
    # Long random rollouts: always inside the bounds and on the pixel grid.
    cfg = tw.ToyWorldConfig(num_frames=200, max_speed=3)
    ep, _ = tw.sample_batch(jax.random.key(3), 4, cfg)
    st = np.asarray(ep.states)
    assert (st >= lo).all() and (st <= hi).all()
    np.testing.assert_array_equal((st - lo) % 1, 0)
    assert np.abs(np.diff(st[:, :, 1:], axis=1)).max() <= cfg.max_speed


def test_metrics_zero_on_truth_positive_on_perturbed(batch):
    ep, frames = batch
    err, drift, acc = _metrics(frames, ep.states, ep.actions, ep.colors, CFG)
    np.testing.assert_array_equal(err, 0.0)
    np.testing.assert_array_equal(drift, 0.0)
    np.testing.assert_array_equal(acc, 1.0)

    # Perturbation growing with frame index: +t px on x of every sprite (wrapping roll of frames).
    shifted = jnp.stack([jnp.roll(frames[:, t], t, axis=2) for t in range(CFG.num_frames)], 1)
    err, drift, acc = _metrics(shifted, ep.states, ep.actions, ep.colors, CFG)
    assert (err > 0).all()
    assert (np.asarray(drift[:, 0]) == 0).all() and (np.asarray(drift[:, 1:]) > 0).all()
    assert float(drift[:, -1].mean()) > float(drift[:, 1].mean())

    # Frames following different actions: lower action-following accuracy.
    other = (ep.actions + 1) % tw.NUM_ACTIONS
    st_other = jax.vmap(lambda i, a: tw.simulate(i, a, CFG))(ep.init_state, other)
    wrong = _render(st_other, ep.colors, ep.scene, CFG)
    _, _, acc = _metrics(wrong, ep.states, ep.actions, ep.colors, CFG)
    assert float(acc.mean()) < 0.5

    # Empty (background-only) video: every sprite missing costs the image diagonal.
    blank = jnp.broadcast_to(tw.background(0, CFG), frames.shape)
    err, drift, acc = _metrics(blank, ep.states, ep.actions, ep.colors, CFG)
    np.testing.assert_allclose(err, np.hypot(32, 32), rtol=1e-6)
    np.testing.assert_array_equal(acc, 0.0)


def test_bad_input_raises_value_error(batch):
    ep, frames = batch
    init = jax.tree.map(lambda x: x[0], ep.init_state)
    with pytest.raises(ValueError, match="action id 5 out of vocabulary"):
        tw.simulate(init, jnp.array([0, 1, 5]), CFG)
    with pytest.raises(ValueError, match="action id -1 out of vocabulary"):
        tw.action_following_accuracy(frames[0], ep.actions[0].at[3].set(-1), ep.colors[0], CFG)
    with pytest.raises(ValueError, match=r"actions must have shape \[T\]"):
        tw.simulate(init, jnp.zeros((2, 3), jnp.int32), CFG)
    with pytest.raises(ValueError, match=r"frames must have shape \[T, 32, 32, 3\]"):
        tw.detect(frames[0, :, :16], ep.colors[0], CFG)
    with pytest.raises(ValueError, match=r"pred_frames must have shape"):
        tw.trajectory_error(frames[0, ..., :1], ep.states[0], ep.colors[0], CFG)
    with pytest.raises(ValueError, match="pred_frames has 15 frames but true_states has 16"):
        tw.drift_by_frame(frames[0, 1:], ep.states[0], ep.colors[0], CFG)
    with pytest.raises(ValueError, match="colors"):
        tw.detect(frames[0], jnp.array([0, 1]), CFG)
    with pytest.raises(ValueError, match="num_sprites=7 exceeds palette"):
        tw.ToyWorldConfig(num_sprites=7)
    with pytest.raises(ValueError, match="sprite_size"):
        tw.ToyWorldConfig(sprite_size=32)


def test_scattered_pixels_of_a_sprite_colour_are_not_a_detection():
    """Noise that happens to hit a sprite's colour here and there must not score as a sprite
    near the image centre (it used to beat a clean but empty frame)."""
    cfg = tw.ToyWorldConfig(num_frames=1, height=16, width=16, num_sprites=1, sprite_size=3)
    frame = np.full((1, 16, 16, 3), 0.3, np.float32)
    for y, x in ((1, 1), (1, 14), (14, 1), (14, 14), (8, 8)):  # red pixels far apart
        frame[0, y, x] = tw.PALETTE[0]
    pos, cov = tw.detect(frame, jnp.array([0]), cfg)
    assert np.isnan(np.asarray(pos)).all()
    np.testing.assert_allclose(float(cov[0, 0]), 5 / 9, rtol=1e-6)
    diag = float(np.hypot(16, 16))
    np.testing.assert_allclose(tw.trajectory_error(frame, jnp.array([[[8.0, 8.0]]]), jnp.array([0]), cfg), diag)
    frame[0, 7:10, 7:10] = tw.PALETTE[0]  # a real sprite + one stray pixel: found
    frame[0, (1, 1, 14, 14), (1, 14, 1, 14)] = 0.3
    frame[0, 5, 8] = tw.PALETTE[0]
    pos, _ = tw.detect(frame, jnp.array([0]), cfg)
    np.testing.assert_allclose(np.asarray(pos)[0, 0], [8.0, 7.7], atol=1e-5)  # (9 * 8 + 5) / 10
