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
    static = ("pattern", "cache_frames", "write_cache", "ad")
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
        o, cache = run(x[:, s:e], t[:, s:e], ctx, a[:, s:e], pattern=pat, cache=cache, cache_frames=s, write_cache=True)
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
        _, cache = run(
            x0[:, s:e], zeros[:, s:e], ctx, a[:, s:e], pattern=pat, cache=cache, cache_frames=s, write_cache=True
        )


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


# ----------------------------------------------------------------------------- KV-cache variants
# (kv_update, per-layer cache, traced cache_frames, per-layer parameters); "concat"/stacked is the default path.
KV_VARIANTS = {
    "inplace_stacked": ("inplace", False, False, False),
    "inplace_stacked_loop": ("inplace", False, False, True),
    "concat_per_layer": ("concat", True, False, False),
    "inplace_per_layer": ("inplace", True, False, True),
    "inplace_per_layer_traced": ("inplace", True, True, True),
}


@functools.lru_cache(maxsize=2)
def jitted_variants(traced=False):
    """(jitted apply, params, per-layer params); with `traced` cache_frames is a traced argument."""
    apply, params = functional(model())
    static = ("pattern", "write_cache", "ad", "kv_update") + (() if traced else ("cache_frames",))
    return jax.jit(apply, static_argnames=static), params, split_layer_params(params)


def stream_blocks(pat, x, t, ctx, a, variant):
    """Stream the video block by block with one KV variant: (output, final cache (stacked))."""
    kv_update, per_layer, traced, use_lp = KV_VARIANTS[variant] if variant else ("concat", False, False, False)
    apply, params, lp = jitted_variants(traced)
    frames = x.shape[1]
    cache = KVCache.create(CFG, x.shape[0], frames, TPF, per_layer=per_layer)
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
            actions=a[:, s:e],
            pattern=p,
            cache=cache,
            cache_frames=jnp.int32(s) if traced else s,
            write_cache=True,
            kv_update=kv_update,
            layer_params=lp if use_lp else None,
        )
        outs.append(o)
    assert cache.per_layer == per_layer
    return jnp.concatenate(outs, axis=1), cache.stacked()


@pytest.mark.parametrize("variant", list(KV_VARIANTS))
@pytest.mark.parametrize("first,chunk,frames", [(1, 1, 4), (1, 3, 7)])
def test_kv_variants_stream_like_full_block_causal_and_fill_the_same_cache(first, chunk, frames, variant):
    pat = AttentionPattern("block_causal", chunk, first)
    x, t, ctx, a = inputs(12, frames)
    full = run(x, t, ctx, a, pattern=pat)
    ref_out, ref_cache = stream_blocks(pat, x, t, ctx, a, None)
    out, cache = stream_blocks(pat, x, t, ctx, a, variant)
    assert float(jnp.abs(out - full).max()) <= 1e-5 * float(jnp.abs(full).max())
    if KV_VARIANTS[variant][2]:  # traced length: masked softmax over the whole buffer (other rounding)
        np.testing.assert_allclose(cache.k, ref_cache.k, atol=1e-5)
        np.testing.assert_allclose(cache.v, ref_cache.v, atol=1e-5)
    else:  # the same attention inputs: the very same cache
        np.testing.assert_array_equal(cache.k, ref_cache.k)
        np.testing.assert_array_equal(cache.v, ref_cache.v)
        np.testing.assert_array_equal(out, ref_out)


@functools.lru_cache(maxsize=1)
def grad_case():
    """(jitted grad of a loss through one cached call, jitted jvp of it, params, x) per variant name."""
    pat = AttentionPattern("block_causal", 2, 1)
    x, t, ctx, a = inputs(13, 5)
    apply, params = functional(model())
    cache = KVCache.create(CFG, 2, 5, TPF)
    for s, e in ((0, 1), (1, 3)):
        _, cache = apply(
            params,
            x[:, s:e],
            t[:, s:e],
            ctx,
            actions=a[:, s:e],
            pattern=pat,
            cache=cache,
            cache_frames=s,
            write_cache=True,
        )
    target = jax.random.normal(jax.random.key(130), x[:, 3:5].shape)

    def loss(p, xb, var, ad="vjp"):
        kv_update, per_layer, traced, use_lp = KV_VARIANTS[var] if var else ("concat", False, False, False)
        c = cache.split() if per_layer else cache
        out, c2 = apply(
            p,
            xb,
            t[:, 3:5],
            ctx,
            actions=a[:, 3:5],
            cache=c,
            write_cache=True,
            kv_update=kv_update,
            ad=ad,
            pattern=AttentionPattern("block_causal", 2) if traced else pat,
            cache_frames=jnp.int32(3) if traced else 3,
            layer_params=split_layer_params(p) if use_lp else None,
        )
        # the written cache is stop-gradient: it must not change the gradient
        return jnp.mean((out - target) ** 2) + jnp.sum(c2.stacked().k) * 0.5

    grad = jax.jit(jax.grad(loss), static_argnums=2)
    tangent = jax.jit(
        lambda xb, dx, var: jax.jvp(lambda z: loss(params, z, var, "jvp"), (xb,), (dx,))[1], static_argnums=2
    )
    return grad, tangent, params, x[:, 3:5]


@pytest.mark.parametrize("variant", ["inplace_stacked", "inplace_per_layer", "inplace_per_layer_traced"])
def test_kv_variants_keep_gradients_and_tangents(variant):
    """New keys carry gradients / tangents, cached ones do not: same as concatenating."""
    grad, tangent, params, xb = grad_case()
    g_ref, g = grad(params, xb, None), grad(params, xb, variant)
    num = sum(float(jnp.sum((u - w) ** 2)) for u, w in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)))
    den = sum(float(jnp.sum(w**2)) for w in jax.tree.leaves(g_ref))
    assert (num / den) ** 0.5 < 1e-5
    dx = jax.random.normal(jax.random.key(131), xb.shape)
    ref = float(tangent(xb, dx, None))
    assert abs(float(tangent(xb, dx, variant)) - ref) <= 1e-5 * abs(ref)


def test_kv_variant_errors():
    x, t, ctx, a = inputs(14, 2)
    apply, params = functional(model())
    per_layer = KVCache.create(CFG, 2, 4, TPF, per_layer=True)
    stacked = KVCache.create(CFG, 2, 4, TPF)
    one = AttentionPattern("block_causal", 2)
    kw = dict(actions=a, write_cache=True)
    with pytest.raises(ValueError, match="kv_update must be one of"):
        apply(params, x, t, ctx, pattern=one, cache=stacked, kv_update="copy", **kw)
    with pytest.raises(ValueError, match="traced cache_frames needs a per-layer KV cache"):
        apply(params, x, t, ctx, pattern=one, cache=stacked, cache_frames=jnp.int32(2), kv_update="inplace", **kw)
    with pytest.raises(ValueError, match="traced cache_frames needs a per-layer KV cache"):
        apply(params, x, t, ctx, pattern=one, cache=per_layer, cache_frames=jnp.int32(2), **kw)
    with pytest.raises(ValueError, match="without a local window and a call of one block"):
        apply(
            params,
            x,
            t,
            ctx,
            pattern=AttentionPattern("block_causal", 1),
            cache=per_layer,
            cache_frames=jnp.int32(2),
            kv_update="inplace",
            **kw,
        )
    window = AttentionPattern("block_causal", 1, local_attn_blocks=1)  # cached frames out of the window
    with pytest.raises(ValueError, match="every query of the call must see every cached key"):
        apply(
            params,
            x[:, :1],
            t[:, :1],
            ctx,
            actions=a[:, :1],
            pattern=window,
            cache=per_layer,
            cache_frames=2,
            write_cache=True,
            kv_update="inplace",
        )
    remat = functional(WanModel(CFG.replace(remat="block"), rngs=nnx.Rngs(0)))[0]
    for lp in (None, split_layer_params(params)):  # layer scan and Python layer loop
        with pytest.raises(ValueError, match="remat='block' would save it at every layer"):
            remat(params, x, t, ctx, pattern=one, cache=stacked, kv_update="inplace", layer_params=lp, **kw)
    with pytest.raises(ValueError, match="layer_params must hold 2 layers"):
        apply(params, x, t, ctx, pattern=one, cache=stacked, layer_params=split_layer_params(params)[:1], **kw)
    with pytest.raises(ValueError, match="KV cache has 1 layers"):
        apply(params, x, t, ctx, pattern=one, cache=KVCache(per_layer.k[:1], per_layer.v[:1]), **kw)


@pytest.mark.parametrize("path", ["full_scan", "concat_scan", "inplace_scan", "per_layer_loop"])
def test_text_kv_gives_the_same_output(path):
    """Cross-attention keys/values computed once (`WanModel.text_kv`, per layer or stacked) give the
    output of the calls that project the text themselves, on every layer path."""
    x, t, ctx, a = inputs(15, 3)
    apply, params = functional(model())
    pat = AttentionPattern("block_causal", 1)
    for per_layer in (True, False):
        tkv = jax.jit(apply.text_kv, static_argnums=2)(params, ctx, per_layer)
        assert len(tkv.k) == CFG.num_layers and tkv.k[0].shape == (2, CFG.text_len, CFG.num_heads, CFG.head_dim)
        if path == "full_scan":
            kw = dict(pattern=pat)
        elif path == "concat_scan":
            kw = dict(pattern=pat, cache=KVCache.create(CFG, 2, 4, TPF), cache_frames=1, write_cache=True)
        elif path == "inplace_scan":
            kw = dict(
                pattern=pat, cache=KVCache.create(CFG, 2, 4, TPF), cache_frames=1, write_cache=True, kv_update="inplace"
            )
        else:
            kw = dict(
                pattern=pat,
                cache=KVCache.create(CFG, 2, 4, TPF, per_layer=True),
                cache_frames=1,
                write_cache=True,
                kv_update="inplace",
                layer_params=split_layer_params(params),
            )
        xs, ts, acts = (x[:, :1], t[:, :1], a[:, :1]) if "cache" in kw else (x, t, a)
        ref = apply(params, xs, ts, ctx, actions=acts, **kw)
        got = apply(params, xs, ts, ctx, actions=acts, text_kv=tkv, **kw)
        for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_text_kv_errors():
    x, t, ctx, a = inputs(16, 2)
    apply, params = functional(model())
    tkv = apply.text_kv(params, ctx)
    with pytest.raises(ValueError, match="text_kv must hold"):
        apply(params, x, t, ctx, actions=a, text_kv=type(tkv)(tkv.k[:1], tkv.v[:1]))
    with pytest.raises(ValueError, match="text_kv must hold"):  # another batch size
        apply(params, x[:1], t[:1], ctx[:1], actions=a[:1], text_kv=tkv)
    with pytest.raises(ValueError, match="context must be"):
        apply.text_kv(params, ctx[..., :-1])
