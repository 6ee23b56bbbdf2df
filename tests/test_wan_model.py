"""The Wan2.1 DiT: masks, causality, teacher forcing, KV-cache streaming, autodiff, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crm_jax.models.config import TINY
from crm_jax.models.wan import AttentionPattern, KVCache, WanModel, functional, split_layer_params

CFG = TINY.replace(num_actions=5)
H, W = 4, 6  # latent size -> 2 x 3 = 6 tokens per frame
TPF = 6


@functools.lru_cache(maxsize=1)
def model():
    return WanModel(CFG, rngs=nnx.Rngs(0))


@functools.lru_cache(maxsize=1)
def jitted():
    apply, params = functional(model())
    static = ("pattern", "cache_frames", "ad")
    return jax.jit(apply, static_argnames=static), params


def inputs(seed, frames, batch=2):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k1, (batch, frames, H, W, CFG.in_channels))
    t = jax.random.uniform(k2, (batch, frames))
    ctx = jax.random.normal(k3, (batch, CFG.text_len, CFG.text_dim))
    actions = jax.random.randint(k4, (batch, frames), 0, CFG.num_actions)
    return x, t, ctx, actions


def run(x, t, ctx, actions=None, **kw):
    apply, params = jitted()
    return apply(params, x, t, ctx, actions=actions, **kw)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_one_block_is_bidirectional():
    x, t, ctx, a = inputs(0, 4)
    full = run(x, t, ctx, a)
    one = run(x, t, ctx, a, pattern=AttentionPattern("block_causal", block_frames=4))
    assert rel(one, full) < 1e-6


@pytest.mark.parametrize("first,chunk", [(1, 1), (1, 2), (2, 2)])
def test_block_causal_is_causal(first, chunk):
    pat = AttentionPattern("block_causal", chunk, first)
    x, t, ctx, a = inputs(1, 5)
    y = run(x, t, ctx, a, pattern=pat)
    # change the last block's frames: earlier blocks must not move, the last must
    last = pat.block_starts(5)[-1]
    x2 = x.at[:, last:].add(1.0)
    y2 = run(x2, t, ctx, a, pattern=pat)
    np.testing.assert_allclose(y2[:, :last], y[:, :last], rtol=0, atol=1e-6)
    assert float(jnp.abs(y2[:, last:] - y[:, last:]).max()) > 1e-3
    # and full attention is not causal
    yf, yf2 = run(x, t, ctx, a), run(x2, t, ctx, a)
    assert float(jnp.abs(yf2[:, :last] - yf[:, :last]).max()) > 1e-3


@pytest.mark.parametrize("first,chunk,frames", [(1, 1, 4), (1, 3, 7), (2, 2, 6)])
def test_streaming_equals_full_block_causal(first, chunk, frames):
    pat = AttentionPattern("block_causal", chunk, first)
    x, t, ctx, a = inputs(2, frames)
    full = run(x, t, ctx, a, pattern=pat)
    cache = KVCache.create(CFG, 2, frames, TPF)
    starts = pat.block_starts(frames) + [frames]
    outs = []
    for s, e in zip(starts[:-1], starts[1:]):
        o, cache = run(x[:, s:e], t[:, s:e], ctx, a[:, s:e], pattern=pat, cache=cache, cache_frames=s)
        outs.append(o)
    stream = jnp.concatenate(outs, axis=1)
    assert float(jnp.abs(stream - full).max()) <= 1e-5 * float(jnp.abs(full).max())


@pytest.mark.parametrize("first,chunk", [(1, 1), (1, 2)])
def test_teacher_forcing_equals_cached_clean_prefix(first, chunk):
    frames = 5
    pat = AttentionPattern("block_causal", chunk, first)
    tf = AttentionPattern("teacher_forcing", chunk, first)
    x0, t, ctx, a = inputs(3, frames)
    xt, _, _, _ = inputs(4, frames)
    zeros = jnp.zeros_like(t)
    packed = run(
        jnp.concatenate([x0, xt], 1), jnp.concatenate([zeros, t], 1), ctx, jnp.concatenate([a, a], 1), pattern=tf
    )
    # clean half = block-causal forward of the clean video at t = 0
    clean = run(x0, zeros, ctx, a, pattern=pat)
    assert rel(packed[:, :frames], clean) < 1e-5
    # noisy half, block by block = that block with the clean prefix in the cache
    cache = KVCache.create(CFG, 2, frames, TPF)
    starts = pat.block_starts(frames) + [frames]
    for s, e in zip(starts[:-1], starts[1:]):
        noisy, _ = run(xt[:, s:e], t[:, s:e], ctx, a[:, s:e], pattern=pat, cache=cache, cache_frames=s)
        assert rel(packed[:, frames + s : frames + e], noisy) < 1e-5, (s, e)
        _, cache = run(x0[:, s:e], zeros[:, s:e], ctx, a[:, s:e], pattern=pat, cache=cache, cache_frames=s)


def test_per_frame_time_only_changes_modulation_of_that_frame_under_causality():
    pat = AttentionPattern("block_causal", 1)
    x, t, ctx, a = inputs(5, 3)
    y = run(x, t, ctx, a, pattern=pat)
    y2 = run(x, t.at[:, 2].set(0.0), ctx, a, pattern=pat)
    np.testing.assert_allclose(y2[:, :2], y[:, :2], atol=1e-6)
    assert float(jnp.abs(y2[:, 2] - y[:, 2]).max()) > 1e-3


def _params_fn():
    apply, params = functional(model())

    @functools.partial(jax.jit, static_argnames="ad")
    def f(p, x, t, ctx, a, ad="vjp"):
        return apply(p, x, t, ctx, actions=a, ad=ad, pattern=AttentionPattern("block_causal", 1))

    return f, params


def test_jvp_matches_finite_difference():
    f, params = _params_fn()
    x, t, ctx, a = inputs(6, 3)
    dx = jax.random.normal(jax.random.key(60), x.shape)
    dt = jax.random.uniform(jax.random.key(61), t.shape) * 0.1
    g = lambda x, t: f(params, x, t, ctx, a, ad="jvp")
    _, tangent = jax.jvp(g, (x, t), (dx, dt))
    eps = 1e-3
    fd = (g(x + eps * dx, t + eps * dt) - g(x - eps * dx, t - eps * dt)) / (2 * eps)
    assert rel(tangent, fd) < 1e-2


def test_grad_matches_finite_difference():
    f, params = _params_fn()
    x, t, ctx, a = inputs(7, 3)
    target = jax.random.normal(jax.random.key(70), x.shape)
    loss = lambda p: jnp.mean((f(p, x, t, ctx, a) - target) ** 2)
    grads = jax.grad(loss)(params)
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(71), p.shape, p.dtype), params)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
    fd = (loss(shift(eps)) - loss(shift(-eps))) / (2 * eps)
    assert abs(float(analytic) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-6


@pytest.mark.parametrize(
    "case,msg",
    [
        ("x_rank", r"x must be \[B, T, H, W, C=4\]"),
        ("x_channels", r"got \(2, 3, 4, 6, 3\)"),
        ("patch", "not divisible by patch"),
        ("t_shape", r"t must be per-frame \[B, T\] = \(2, 3\), got \(2,\)"),
        ("text_len", r"context must be \[B, text_len, text_dim\] = \(2, 8, 32\), got \(2, 5, 32\)"),
        ("tf_odd", "T must be even"),
        ("cache_boundary", "block boundary"),
        ("cache_missing", "need a cache"),
    ],
)
def test_bad_input_raises(case, msg):
    x, t, ctx, a = inputs(8, 3)
    kw = {}
    if case == "x_rank":
        x = x[:, 0]
    elif case == "x_channels":
        x = x[..., :3]
    elif case == "patch":
        x = x[:, :, :3]
    elif case == "t_shape":
        t = t[:, 0]
    elif case == "text_len":
        ctx = ctx[:, :5]
    elif case == "tf_odd":
        kw = dict(pattern=AttentionPattern("teacher_forcing", 1))
    elif case == "cache_boundary":
        kw = dict(pattern=AttentionPattern("block_causal", 2), cache=KVCache.create(CFG, 2, 8, TPF), cache_frames=1)
    elif case == "cache_missing":
        kw = dict(cache_frames=2)
    with pytest.raises(ValueError, match=msg):
        run(x, t, ctx, a, **kw)


def test_jvp_and_grad_with_pallas_kernels_equal_reference_attention():
    """The tiny model with the Triton kernels (interpret mode) vs the XLA reference attention."""
    cfg = CFG.replace(dim=128, num_heads=2, num_layers=1)  # head_dim 64: a kernel size
    ref_model = WanModel(cfg.replace(attn_impl="xla"), rngs=nnx.Rngs(3))
    ker_model = WanModel(cfg.replace(attn_impl="triton", attn_interpret=True), rngs=nnx.Rngs(3))
    ref, params = functional(ref_model)
    ker, _ = functional(ker_model)
    pat = AttentionPattern("teacher_forcing", 1)
    k = jax.random.split(jax.random.key(11), 5)
    x = jax.random.normal(k[0], (1, 4, H, W, cfg.in_channels))
    t = jnp.concatenate([jnp.zeros((1, 2)), jax.random.uniform(k[1], (1, 2))], 1)
    ctx = jax.random.normal(k[2], (1, cfg.text_len, cfg.text_dim))
    dx = jnp.concatenate(
        [jnp.zeros((1, 2, H, W, cfg.in_channels)), jax.random.normal(k[3], (1, 2, H, W, cfg.in_channels))], 1
    )
    dt = jnp.concatenate([jnp.zeros((1, 2)), jnp.ones((1, 2))], 1)
    f = lambda apply, ad: lambda x, t: apply(params, x, t, ctx, pattern=pat, ad=ad)
    o_ref, do_ref = jax.jvp(f(ref, "jvp"), (x, t), (dx, dt))
    o_ker, do_ker = jax.jvp(f(ker, "jvp"), (x, t), (dx, dt))
    assert rel(o_ker, o_ref) < 1e-5 and rel(do_ker, do_ref) < 1e-5
    target = jax.random.normal(k[4], x.shape)
    loss = lambda apply: lambda p: jnp.mean((apply(p, x, t, ctx, pattern=pat) - target) ** 2)
    g_ref, g_ker = jax.grad(loss(ref))(params), jax.grad(loss(ker))(params)
    num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(g_ker), jax.tree.leaves(g_ref)))
    den = sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(g_ref))
    assert (num / den) ** 0.5 < 1e-5
    with pytest.raises(Exception, match="jvp|custom_vjp|forward-mode"):
        jax.jvp(f(ker, "vjp"), (x, t), (dx, dt))


# ----------------------------------------------------------------------------- KV cache
@functools.lru_cache(maxsize=2)
def jitted_cached(traced=False):
    """(jitted apply, params, per-layer params); with `traced` cache_frames is a traced argument."""
    apply, params = functional(model())
    static = ("pattern", "ad") + (() if traced else ("cache_frames",))
    return jax.jit(apply, static_argnames=static), params, split_layer_params(params)


def stream_blocks(pat, x, t, ctx, a, traced=False, use_layer_params=False):
    """Stream the video block by block over the KV cache: (output, final cache)."""
    apply, params, lp = jitted_cached(traced)
    frames = x.shape[1]
    cache = KVCache.create(CFG, x.shape[0], frames, TPF)
    starts = pat.block_starts(frames) + [frames]
    outs = []
    for s, e in zip(starts[:-1], starts[1:]):
        # a traced length needs a pattern whose block is the call (the sampler's buffer pattern)
        p = AttentionPattern("block_causal", max(pat.block_frames, pat.first)) if traced else pat
        o, cache = apply(
            params,
            x[:, s:e],
            t[:, s:e],
            ctx,
            p,
            actions=a[:, s:e],
            cache=cache,
            cache_frames=jnp.int32(s) if traced else s,
            layer_params=lp if use_layer_params else None,
        )
        outs.append(o)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("traced,use_layer_params", [(False, False), (False, True), (True, True)])
@pytest.mark.parametrize("first,chunk,frames", [(1, 1, 4), (1, 3, 7)])
def test_cached_calls_stream_like_full_block_causal(first, chunk, frames, traced, use_layer_params):
    """Static or traced cache lengths, sliced or per-layer parameters: the full-sequence output, and
    a cache holding the keys of the full sequence."""
    pat = AttentionPattern("block_causal", chunk, first)
    x, t, ctx, a = inputs(12, frames)
    full = run(x, t, ctx, a, pattern=pat)
    out, cache = stream_blocks(pat, x, t, ctx, a, traced, use_layer_params)
    assert float(jnp.abs(out - full).max()) <= 1e-5 * float(jnp.abs(full).max())
    ref_out, ref_cache = stream_blocks(pat, x, t, ctx, a)
    for got, want in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        if traced:  # masked softmax over the whole buffer (other rounding)
            np.testing.assert_allclose(got, want, atol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)


def test_windowed_cached_calls_equal_full_windowed_pattern():
    """A local window hides cached frames from the call: masked attention over the cache prefix."""
    pat = AttentionPattern("block_causal", 1, local_attn_blocks=2, sink_blocks=1)
    x, t, ctx, a = inputs(17, 6)
    full = run(x, t, ctx, a, pattern=pat)
    out, _ = stream_blocks(pat, x, t, ctx, a)
    assert float(jnp.abs(out - full).max()) <= 1e-5 * float(jnp.abs(full).max())


@functools.lru_cache(maxsize=1)
def grad_case():
    """(loss(params, xb, traced, ad) through one cached call after two cached blocks, params, xb)."""
    pat = AttentionPattern("block_causal", 2, 1)
    x, t, ctx, a = inputs(13, 5)
    apply, params = functional(model())
    cache = KVCache.create(CFG, 2, 5, TPF)
    for s, e in ((0, 1), (1, 3)):
        _, cache = apply(params, x[:, s:e], t[:, s:e], ctx, pat, actions=a[:, s:e], cache=cache, cache_frames=s)
    target = jax.random.normal(jax.random.key(130), x[:, 3:5].shape)

    def loss(p, xb, traced=False, ad="vjp", cache_weight=0.0):
        out, c2 = apply(
            p,
            xb,
            t[:, 3:5],
            ctx,
            AttentionPattern("block_causal", 2) if traced else pat,
            actions=a[:, 3:5],
            cache=cache,
            cache_frames=jnp.int32(3) if traced else 3,
            layer_params=split_layer_params(p) if traced else None,
            ad=ad,
        )
        return jnp.mean((out - target) ** 2) + cache_weight * sum(jnp.sum(k) for k in c2.k)

    return loss, params, x[:, 3:5]


@pytest.mark.parametrize("traced", [False, True])
def test_cached_call_gradients_and_tangents_match_finite_differences(traced):
    """The call's own keys carry gradients and tangents (the cache it reads is an input); the cache it
    returns is stop-gradient."""
    loss, params, xb = grad_case()
    direction = jax.tree.map(lambda p: jax.random.normal(jax.random.key(132), p.shape, p.dtype), params)
    grads = jax.jit(jax.grad(loss), static_argnums=2)(params, xb, traced)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
    fd = (loss(shift(eps), xb, traced) - loss(shift(-eps), xb, traced)) / (2 * eps)
    assert abs(float(analytic) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-6
    g_cache = jax.grad(lambda p: loss(p, xb, traced, cache_weight=1.0) - loss(p, xb, traced))(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_cache)) < 1e-6

    dx = jax.random.normal(jax.random.key(131), xb.shape)
    _, tangent = jax.jvp(lambda z: loss(params, z, traced, "jvp"), (xb,), (dx,))
    fd = (loss(params, xb + eps * dx, traced) - loss(params, xb - eps * dx, traced)) / (2 * eps)
    assert abs(float(tangent) - float(fd)) <= 2e-2 * abs(float(fd)) + 1e-6


def test_cache_errors():
    x, t, ctx, a = inputs(14, 2)
    apply, params = functional(model())
    cache = KVCache.create(CFG, 2, 4, TPF)
    one = AttentionPattern("block_causal", 2)
    with pytest.raises(ValueError, match="without a local window and a call of one block"):
        apply(params, x, t, ctx, AttentionPattern("block_causal", 1), actions=a, cache=cache, cache_frames=jnp.int32(2))
    with pytest.raises(ValueError, match="layer_params must hold 2 layers"):
        apply(params, x, t, ctx, one, actions=a, cache=cache, layer_params=split_layer_params(params)[:1])
    with pytest.raises(ValueError, match="need a cache"):
        apply(params, x, t, ctx, one, actions=a, layer_params=split_layer_params(params))
    with pytest.raises(ValueError, match="KV cache has 1 layers"):
        apply(params, x, t, ctx, one, actions=a, cache=KVCache(cache.k[:1], cache.v[:1]))
    with pytest.raises(ValueError, match="cannot hold 3 \\+ 2 frames"):
        apply(params, x, t, ctx, AttentionPattern("block_causal", 1), actions=a, cache=cache, cache_frames=3)


@pytest.mark.parametrize("cached", [False, True])
def test_text_kv_context_gives_the_same_output(cached):
    """Cross-attention keys/values computed once (`WanModel.text_kv`) as the context give the output
    of calls that project the text themselves, with and without a cache."""
    x, t, ctx, a = inputs(15, 3)
    apply, params = functional(model())
    pat = AttentionPattern("block_causal", 1)
    tkv = jax.jit(apply.text_kv)(params, ctx)
    assert len(tkv.k) == CFG.num_layers and tkv.k[0].shape == (2, CFG.text_len, CFG.num_heads, CFG.head_dim)
    kw = dict(cache=KVCache.create(CFG, 2, 4, TPF), cache_frames=1) if cached else {}
    xs, ts, acts = (x[:, :1], t[:, :1], a[:, :1]) if cached else (x, t, a)
    ref = apply(params, xs, ts, ctx, pat, actions=acts, **kw)
    got = apply(params, xs, ts, tkv, pat, actions=acts, **kw)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_text_kv_errors():
    x, t, ctx, a = inputs(16, 2)
    apply, params = functional(model())
    tkv = apply.text_kv(params, ctx)
    with pytest.raises(ValueError, match="TextKV context must hold"):
        apply(params, x, t, type(tkv)(tkv.k[:1], tkv.v[:1]), actions=a)
    with pytest.raises(ValueError, match="TextKV context must hold"):  # another batch size
        apply(params, x[:1], t[:1], tkv, actions=a[:1])
    with pytest.raises(ValueError, match="context must be"):
        apply.text_kv(params, ctx[..., :-1])
