"""Streaming sampler: equals the non-streaming block-causal reference, rolling cache, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crm_jax.data.toy_latents import frames_to_latents, latents_to_frames
from crm_jax.models.config import TINY
from crm_jax.models.wan import AttentionPattern, WanModel, functional
from crm_jax.sampling import (
    CacheLayout,
    StreamingSampler,
    TimeSchedule,
    cache_capacity,
    chunk_bounds,
    reference_generate,
)
from pallas_kernels import masks

CFG = TINY.replace(num_actions=5)
HW = (4, 6)  # latent 4 x 6 -> 2 x 3 = 6 tokens per frame
B = 1


@functools.lru_cache(maxsize=1)
def model():
    return functional(WanModel(CFG, rngs=nnx.Rngs(0)))


def context(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, CFG.text_len, CFG.text_dim))


def actions(frames, seed=2):
    return np.asarray(jax.random.randint(jax.random.key(seed), (B, frames), 0, CFG.num_actions))


def sampler(pattern, steps=2, mode="clean", **kw):
    apply, params = model()
    return StreamingSampler(apply, params, CFG, pattern, HW, B, steps, mode, **kw)


def reference(pattern, frames, steps, mode, acts, key):
    apply, params = model()
    return reference_generate(
        apply,
        params,
        CFG,
        key,
        context(),
        frames,
        pattern=pattern,
        latent_hw=HW,
        steps=steps,
        context_mode=mode,
        actions=acts,
    )


def assert_close(a, b):
    """Max abs difference <= 1e-5 (float32; the latents are O(1), max |x| ~ 5)."""
    err = float(jnp.abs(a - b).max())
    assert err <= 1e-5, err


PATTERNS = {
    "framewise": (AttentionPattern("block_causal", 1), 3),
    "chunkwise": (AttentionPattern("block_causal", 2), 4),
    "chunk_first1": (AttentionPattern("block_causal", 2, first_block_frames=1), 3),
}


@pytest.mark.parametrize("steps", [1, 2, 4, (4, 2)])
@pytest.mark.parametrize("mode", ["clean", "noisy"])
@pytest.mark.parametrize("name", ["framewise", "chunkwise"])
def test_streaming_equals_reference(name, mode, steps):
    pattern, frames = PATTERNS[name]
    acts, key = actions(frames), jax.random.key(3)
    s = sampler(pattern, steps, mode)
    chunks = list(s.stream(key, context(), frames, acts))
    assert [c.start for c in chunks] == [a for a, _ in chunk_bounds(pattern, frames)]
    video = jnp.concatenate([c.frames for c in chunks], axis=1)
    assert video.shape == (B, frames, *HW, CFG.in_channels)
    assert bool(jnp.isfinite(video).all())
    assert_close(video, reference(pattern, frames, steps, mode, acts, key))


def sampler_with(pattern, steps, mode, traced, **kw):
    """A sampler whose cache length is traced (CPU: XLA cache attention) or static (as on backends
    without a traced length, e.g. Triton: one compile per cache layout)."""
    s = sampler(pattern, steps, mode, **kw)
    assert s.traced_cache_len  # CPU: XLA attention
    s.traced_cache_len = traced
    return s


@functools.cache
def cached_reference(name, frames, steps, mode, seed):
    pattern = ROLL if name == "roll" else PATTERNS[name][0]
    return reference(pattern, frames, steps, mode, actions(frames), jax.random.key(seed))


@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("mode", ["clean", "noisy"])
@pytest.mark.parametrize("name", ["framewise", "chunkwise"])
def test_traced_and_static_cache_lengths_equal_reference(name, mode, traced):
    pattern, frames = PATTERNS[name]
    s = sampler_with(pattern, 2, mode, traced)
    before = s.compiled_count()
    video = s.generate(jax.random.key(3), context(), frames, actions(frames))
    if traced:  # one compile for every cache length of this chunk shape (+ the re-run's)
        assert s.compiled_count() - before <= 1 + (mode == "clean")
    assert s.cache is None and video.shape == (B, frames, *HW, CFG.in_channels)
    assert_close(video, cached_reference(name, frames, 2, mode, 3))


def test_modes_and_steps_differ_and_first_block_differs():
    """Sanity: the modes are not accidentally the same computation; a short first block works."""
    pattern, frames = PATTERNS["chunk_first1"]
    acts, key = actions(frames), jax.random.key(4)
    clean = sampler(pattern, 2, "clean").generate(key, context(), frames, acts)
    noisy = sampler(pattern, 2, "noisy").generate(key, context(), frames, acts)
    one = sampler(pattern, 1, "clean").generate(key, context(), frames, acts)
    np.testing.assert_allclose(clean[:, :1], noisy[:, :1], atol=1e-6)  # first chunk: no context yet
    assert float(jnp.abs(clean[:, 1:] - noisy[:, 1:]).max()) > 1e-4
    assert float(jnp.abs(clean - one).max()) > 1e-4
    assert_close(clean, reference(pattern, frames, 2, "clean", acts, key))
    # explicit per-chunk grids = the default grids
    grids = TimeSchedule(grids=((1600 / 1601, 15 / 16), (1600 / 1601,)))
    assert grids.num_steps(0) == 2 and grids.num_steps(5) == 1
    a = sampler(pattern, grids, "clean").generate(key, context(), frames, acts)
    b = sampler(pattern, (2, 1), "clean").generate(key, context(), frames, acts)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_clean_rerun_is_dispatched_after_each_chunk_but_the_last():
    """In clean mode each chunk is handed over after its denoising calls, with the re-run that writes its
    clean keys/values queued right after them, but not after the last chunk (nothing reads that cache)."""
    pattern, frames = PATTERNS["chunkwise"]
    acts, key = actions(frames), jax.random.key(6)
    s = sampler(pattern, 2, "clean")
    order = []

    def log(name, fn):
        def wrapped(*a, **kw):
            order.append(name)
            return fn(*a, **kw)

        return wrapped

    s._jit_rerun, s._jit = log("rerun", s._jit_rerun), log("chunk", s._jit)
    seen = []
    for c in s.stream(key, context(), frames, acts, prefetch=False):
        seen.append((list(order), c.frames))
    n = len(list(chunk_bounds(pattern, frames)))
    assert order == ["chunk", "rerun"] * (n - 1) + ["chunk"]
    assert seen[0][0] == ["chunk", "rerun"]  # queued when chunk 0 is handed over
    assert_close(jnp.concatenate([f for _, f in seen], 1), reference(pattern, frames, 2, "clean", acts, key))
    order.clear()
    sampler(pattern, 2, "noisy").generate(key, context(), frames, acts)  # no re-run in noisy mode
    assert "rerun" not in order


def test_cross_attention_backend_option_gives_the_same_video():
    """cross_attn_impl="xla" (attention_kv_prefix over the whole text) = the default cross-attention."""
    pattern, frames = PATTERNS["framewise"]
    cfg = CFG.replace(cross_attn_impl="xla")
    apply, params = functional(WanModel(cfg, rngs=nnx.Rngs(0)))  # the same weights as model()
    video = StreamingSampler(apply, params, cfg, pattern, HW, B, 2, "clean").generate(
        jax.random.key(3), context(), frames, actions(frames)
    )
    assert_close(video, cached_reference("framewise", frames, 2, "clean", 3))
    with pytest.raises(ValueError, match="cross_attn_impl must be"):
        CFG.replace(cross_attn_impl="flash")


def test_prefetch_and_live_actions_give_the_same_video():
    pattern, frames = PATTERNS["framewise"]
    acts, key = actions(frames), jax.random.key(5)
    s = sampler(pattern, 2, "noisy")
    a = jnp.concatenate([c.frames for c in s.stream(key, context(), frames, acts, prefetch=True)], 1)
    seen = []

    def live(index, start, n):
        seen.append((index, start, n))
        return acts[0, start : start + n]

    b = jnp.concatenate([c.frames for c in s.stream(key, context(), frames, live)], 1)
    c = jnp.concatenate([c.frames for c in s.stream(key, context(), frames, iter(acts[0][:, None]))], 1)
    assert seen == [(0, 0, 1), (1, 1, 1), (2, 2, 1)]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


# ----------------------------------------------------------------------------- rolling cache

ROLL = AttentionPattern("block_causal", 1, local_attn_blocks=2, sink_blocks=1)


@pytest.mark.parametrize("traced", [True, False])
def test_rolling_cache_equals_windowed_reference(traced):
    frames = 5  # evicts from chunk 3 on
    s = sampler_with(ROLL, 2, "clean", traced)
    video = s.generate(jax.random.key(6), context(), frames, actions(frames))
    assert_close(video, cached_reference("roll", frames, 2, "clean", 6))


@pytest.mark.parametrize("traced", [True, False])
def test_rolling_cache_long_video_has_flat_memory(traced):
    capacity = cache_capacity(ROLL, None)
    assert capacity == 3  # 1 sink + 2-block window
    frames = 4 * capacity  # >= 4x the buffer (6x the local window)
    s = sampler_with(ROLL, (2, 1), "noisy", traced)
    shapes, compiled, live = set(), [], []
    out = []
    for c in s.stream(jax.random.key(7), context(), frames, actions(frames)):
        out.append(np.array(c.frames))  # a copy: np.asarray may alias the device buffer
        shapes.add((s.cache.num_layers, s.cache.batch, s.cache.max_tokens))
        compiled.append(s.compiled_count())
        del c
        live.append(sum(a.nbytes for a in jax.live_arrays()))
    assert len(out) == frames and all(np.isfinite(o).all() for o in out)
    assert len(shapes) == 1
    assert next(iter(shapes))[2] == capacity * 6  # tokens: capacity frames
    steady = ROLL.sink_blocks + ROLL.local_attn_blocks + 1
    assert len(set(compiled[steady:])) == 1, compiled  # same compiled function reused
    assert max(live[steady:]) <= live[steady] + 1024, live  # live device bytes stay flat
    # an endless stream works too, and a window-free one is refused
    it = s.stream(jax.random.key(8), context(), None, lambda i, s0, n: [0] * n)
    assert all(next(it).frames.shape == (B, 1, *HW, CFG.in_channels) for _ in range(2 * frames))


@pytest.mark.parametrize(
    "pattern",
    [
        AttentionPattern("block_causal", 1, local_attn_blocks=2, sink_blocks=1),
        AttentionPattern("block_causal", 1, first_block_frames=2, local_attn_blocks=3, sink_blocks=1),
        AttentionPattern("block_causal", 2, first_block_frames=1, local_attn_blocks=2),
        AttentionPattern("block_causal", 3, local_attn_blocks=1, sink_blocks=2),
        AttentionPattern("block_causal", 2, first_block_frames=3),
    ],
)
def test_cache_layout_matches_the_mask(pattern):
    """Frames in the buffer when each chunk runs = frames its queries may see in the mask."""
    frames, tpf = 17, 1
    cap = cache_capacity(pattern, frames)
    lay = CacheLayout(pattern, cap)
    spec = masks.block_causal(
        frames,
        tpf,
        pattern.block_frames,
        pattern.first,
        local_attn_blocks=pattern.local_attn_blocks,
        sink_blocks=pattern.sink_blocks,
    )
    dense = masks.dense_mask(spec)
    buf = []  # frame ids in buffer order
    for s, e in chunk_bounds(pattern, frames):
        c = lay.next(s, e)
        del buf[c.sink_frames : c.sink_frames + c.evict_frames]
        assert len(buf) == c.cache_frames and c.cache_frames + (e - s) <= cap
        visible = sorted(set(np.nonzero(dense[s])[0]) - set(range(s, e)))
        assert sorted(buf) == visible, (s, buf, visible)
        buf += list(range(s, e))


# ----------------------------------------------------------------------------- errors


def test_length_the_cache_cannot_hold_raises():
    s = sampler(AttentionPattern("block_causal", 1), max_cache_frames=4)
    with pytest.raises(ValueError, match="holds at most 4 frames but 5 frames need 5.*rolling window"):
        s.stream(jax.random.key(0), context(), 5)
    with pytest.raises(ValueError, match="endless stream needs a rolling KV cache"):
        s.stream(jax.random.key(0), context(), None)
    with pytest.raises(ValueError, match="cannot hold 2 cached"):
        lay = CacheLayout(AttentionPattern("block_causal", 1), 2)
        for a, b in chunk_bounds(lay.pattern, 3):
            lay.next(a, b)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.array([[0, 5, 1]]), r"action id 5 is outside the vocabulary \[0, 5\)"),
        (np.array([[0, -1, 1]]), "outside the vocabulary"),
        (np.array([[0.5, 1, 1]]), "must be integers"),
        (np.array([[0, 1]]), "actions cover 2 frames but 3"),
        (lambda i, s, n: [9] * n, "chunk 0 .*action id 9 is outside"),
        (lambda i, s, n: [0, 0], r"expected 1 action ids per frame"),
        (iter([]), "ran out"),
    ],
)
def test_bad_actions_raise(bad, msg):
    s = sampler(AttentionPattern("block_causal", 1))
    with pytest.raises(ValueError, match=msg):
        list(s.stream(jax.random.key(0), context(), 3, bad))


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="block_causal"):
        sampler(AttentionPattern("full"))
    with pytest.raises(ValueError, match="context_mode"):
        sampler(AttentionPattern("block_causal", 1), mode="dirty")
    with pytest.raises(ValueError, match="strictly decreasing"):
        TimeSchedule(grids=((0.5, 0.9),))
    with pytest.raises(ValueError, match="num_steps"):
        TimeSchedule(steps=9)
    with pytest.raises(ValueError, match=r"context must be \[B, text_len, text_dim\]"):
        sampler(AttentionPattern("block_causal", 1)).stream(jax.random.key(0), jnp.zeros((2, 3)), 2)
    apply, params = model()
    with pytest.raises(ValueError, match="num_actions=0"):
        StreamingSampler(apply, params, CFG.replace(num_actions=0), AttentionPattern("block_causal", 1), HW).stream(
            jax.random.key(0), context(), 2, [0, 0]
        )
    with pytest.raises(ValueError, match="apply must come from"):
        StreamingSampler(lambda *a, **kw: None, params, CFG, AttentionPattern("block_causal", 1), HW)
    with pytest.raises(ValueError, match="MeanFlow"):  # would silently sample u(x, t, t)
        StreamingSampler(apply, params, CFG.replace(mean_flow=True), AttentionPattern("block_causal", 1), HW)


# ----------------------------------------------------------------------------- toy latents


def test_toy_latents_round_trip():
    frames = np.random.default_rng(0).random((3, 8, 12, 3)).astype(np.float32)
    lat = frames_to_latents(frames)
    assert lat.shape == (3, 4, 6, 12) and lat.min() >= -1 and lat.max() <= 1
    np.testing.assert_allclose(latents_to_frames(lat), frames, atol=1e-6)
    np.testing.assert_allclose(np.asarray(latents_to_frames(frames_to_latents(jnp.asarray(frames)))), frames, atol=1e-6)
    np.testing.assert_allclose(lat[0, 0, 0, 3:6], frames[0, 0, 1] * 2 - 1, atol=1e-6)  # (row 0, col 1)
    with pytest.raises(ValueError, match="not divisible"):
        frames_to_latents(frames[:, :7])
