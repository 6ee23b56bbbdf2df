"""Pallas-Triton flash attention kernels in interpret mode (CPU) vs a float64 reference.

Kernels: forward (O, LSE), backward (dQ, dK, dV), JVP (O, Ȯ); every output is
NaN-poisoned before the kernel runs (aliased output buffers), so an unwritten
element fails the finiteness check. Reference: `attention_reference` in float64
(inputs upcast exactly), differentiated with `jax.vjp` / `jax.jvp`.
Tolerances (relative L2): 1e-5 for float32 inputs, 2e-2 for bfloat16.

Sizes are tiny (tiles of 16/32, a few frames of 7-20 tokens) to keep CPU time low.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks, ops
from pallas_kernels.reference import attention_reference
from pallas_kernels.triton import FlashConfig, Tiles, flash_backward, flash_forward, flash_jvp, kernel_allowed
from tests.attention_helpers import TOL, f64, rand, reference_all, reference_fn, rel

SMALL = FlashConfig(fwd=Tiles(16, 16), jvp=Tiles(16, 16), dkdv=Tiles(16, 16), dq=Tiles(16, 16))
# Different tile shapes per kernel (rectangular tiles, transposed schedule with
# bq != bk, padding multiple larger than some tiles) and index-list walking.
MIXED = FlashConfig(fwd=Tiles(32, 16), jvp=Tiles(16, 32), dkdv=Tiles(16, 32), dq=Tiles(32, 16), full_ranges=False)
CASES = [
    # name, spec, dtype, head_dim, config
    ("full_cross_f32", masks.full(37, 24), jnp.float32, 64, SMALL),
    ("full_cross_bf16_d128", masks.full(20, 48), jnp.bfloat16, 128, SMALL),
    ("bc_frame_f32", masks.block_causal(3, 13, 1), jnp.float32, 64, SMALL),
    ("bc_chunk_f32", masks.block_causal(5, 7, 2, 1), jnp.float32, 64, MIXED),
    (
        "bc_kvcache_local_sink_f32",
        masks.block_causal(6, 9, 1, q_frames=2, local_attn_blocks=2, sink_blocks=1),
        jnp.float32,
        64,
        SMALL,
    ),
    ("bc_qoffset_d128_f32", masks.block_causal(4, 10, 2, 1, q_frames=2), jnp.float32, 128, MIXED),
    ("tf_frame_f32", masks.teacher_forcing(2, 11, 1), jnp.float32, 64, SMALL),
    ("tf_chunk_f32", masks.teacher_forcing(3, 7, 2, 1), jnp.float32, 64, MIXED),
    (
        "tf_chunk_local_bf16_d128",
        masks.teacher_forcing(3, 6, 1, local_attn_blocks=2, sink_blocks=1),
        jnp.bfloat16,
        128,
        SMALL,
    ),
]


@pytest.mark.parametrize("name,spec,dtype,d,config", CASES, ids=[c[0] for c in CASES])
def test_kernels_match_float64_reference(name, spec, dtype, d, config):
    B, H = 1, 2
    q = rand((B, spec.q_len, H, d), dtype)
    k = rand((B, spec.kv_len, H, d), dtype)
    v = rand((B, spec.kv_len, H, d), dtype)
    do = rand(q.shape, dtype)
    tq, tk, tv = rand(q.shape, dtype), rand(k.shape, dtype), rand(v.shape, dtype)
    ro, rlse, (rdq, rdk, rdv), rto = reference_all(spec, q, k, v, do, tq, tk, tv)
    tol = TOL[dtype]
    kw = dict(config=config, interpret=True, poison=True)

    o, lse = flash_forward(q, k, v, spec, **kw)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == (B, H, spec.q_len)
    errs = {"o": rel(o, ro), "lse": rel(lse, rlse)}
    dq, dk, dv = flash_backward(q, k, v, o, lse, do, spec, **kw)
    errs.update(dq=rel(dq, rdq), dk=rel(dk, rdk), dv=rel(dv, rdv))
    o2, to, lse2 = flash_jvp(q, k, v, tq, tk, tv, spec, **kw)
    errs.update(jvp_o=rel(o2, ro), jvp_to=rel(to, rto), jvp_lse=rel(lse2, rlse))
    bad = {key: e for key, e in errs.items() if not e < tol}
    assert not bad, f"{name}: errors above {tol}: {bad} (all: {errs})"


def test_jvp_kernel_partial_tangents():
    """KV-cache style: only Q̇ (K̇ = V̇ = 0 skipped in-kernel), and only V̇."""
    spec = masks.block_causal(4, 9, 1, q_frames=2)
    q = rand((1, spec.q_len, 2, 64), jnp.float32)
    k = rand((1, spec.kv_len, 2, 64), jnp.float32)
    v = rand(k.shape, jnp.float32)
    tq, tv = rand(q.shape, jnp.float32), rand(v.shape, jnp.float32)
    for tans in ((tq, None, None), (None, None, tv)):
        *_, rto = reference_all(spec, q, k, v, q, *tans)
        _, to, _ = flash_jvp(q, k, v, *tans, spec, config=SMALL, interpret=True, poison=True)
        assert rel(to, rto) < 1e-5


@pytest.mark.parametrize(
    "spec",
    [
        masks.block_causal(5, 7, 2, 1),
        masks.block_causal(6, 5, 1, q_frames=2, local_attn_blocks=2, sink_blocks=1),
        masks.teacher_forcing(4, 3, 1, local_attn_blocks=2, sink_blocks=1),
        masks.teacher_forcing(5, 4, 2, 1),
        masks.full(9, 13),
    ],
)
def test_kernel_mask_equals_allowed(spec):
    qp = np.arange(spec.q_len + 5)[:, None]
    kp = np.arange(spec.kv_len + 7)[None, :]
    got = np.asarray(kernel_allowed(spec, jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32)))
    np.testing.assert_array_equal(got, np.broadcast_to(masks.allowed(spec, qp, kp), got.shape))


# ----------------------------------------------------------------------------- public op
def _op(ad, spec):
    return lambda q, k, v: ops.attention(q, k, v, spec, impl="triton", ad=ad, interpret=True, config=SMALL)


def test_op_jvp_matches_reference_jvp():
    spec = masks.teacher_forcing(2, 9, 1)
    w = rand((64, 64), jnp.float32) * 0.2
    x = rand((1, spec.q_len, 2, 64), jnp.float32)
    tx = rand(x.shape, jnp.float32)
    kv_cache = rand(x.shape, jnp.float32)  # closed over: symbolic-zero tangent

    def model(attn):
        def f(x):
            q = jnp.tanh(x @ w)
            k = x @ w.T + kv_cache
            return jnp.sin(attn(q, k, x))

        return f

    y, ty = jax.jvp(model(_op("jvp", spec)), (x,), (tx,))
    with jax.enable_x64(True):
        ry, rty = jax.jvp(model(reference_fn(spec)), (jnp.asarray(f64(x)),), (jnp.asarray(f64(tx)),))
    assert rel(y, ry) < 1e-5 and rel(ty, rty) < 1e-5
    # jit of jvp, tangent only on q (k, v from a cache)
    q, k, v = x, kv_cache, rand(x.shape, jnp.float32)
    f = jax.jit(lambda q, tq: jax.jvp(lambda q: _op("jvp", spec)(q, k, v), (q,), (tq,)))
    _, tq_out = f(q, tx)
    _, rtq = jax.jvp(lambda q: reference_fn(spec)(q, k, v), (q,), (tx,))
    assert rel(tq_out, rtq) < 1e-4  # reference here in float32


def test_op_grad_matches_reference_grad():
    spec = masks.block_causal(3, 11, 1)
    q = rand((1, spec.q_len, 2, 64), jnp.float32)
    k, v = rand(q.shape, jnp.float32), rand(q.shape, jnp.float32)

    def loss(attn):
        return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)) * v)

    g = jax.jit(jax.grad(loss(_op("vjp", spec)), argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64(True):
        rg = jax.grad(loss(reference_fn(spec)), argnums=(0, 1, 2))(*(jnp.asarray(f64(x)) for x in (q, k, v)))
    for a, b in zip(g, rg):
        assert rel(a, b) < 1e-5


def test_jvp_through_vjp_op_errors():
    spec = masks.full(16)
    q = rand((1, 16, 1, 64), jnp.float32)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(_op("vjp", spec), (q, q, q), (q, q, q))


def test_grad_through_jvp_op_errors():
    spec = masks.full(16)
    q = rand((1, 16, 1, 64), jnp.float32)
    with pytest.raises(ValueError, match="forward mode"):
        jax.grad(lambda q: _op("jvp", spec)(q, q, q).sum())(q)
    with pytest.raises(ValueError, match="forward mode"):
        jax.vjp(lambda q: _op("jvp", spec)(q, q, q), q)


def test_auto_on_cpu_is_xla_and_matches_reference():
    spec = masks.block_causal(3, 5, 1)
    q = rand((2, 15, 3, 32), jnp.float32)  # head_dim 32 fine for XLA
    assert ops.resolve_impl("auto") == "xla"
    np.testing.assert_allclose(ops.attention(q, q, q, spec), attention_reference(q, q, q, spec), rtol=1e-6, atol=1e-6)
    # both AD modes work on the XLA path
    jax.jvp(lambda q: ops.attention(q, q, q, spec, ad="jvp"), (q,), (q,))
    jax.grad(lambda q: ops.attention(q, q, q, spec, ad="vjp").sum())(q)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(q=(1, 16, 2)), "rank 4"),
        (dict(k=(1, 16, 2, 64), v=(1, 15, 2, 64)), "same shape"),
        (dict(q=(1, 16, 3, 64)), "agree on B, H, D"),
        (dict(q=(1, 16, 2, 32), k=(1, 16, 2, 32), v=(1, 16, 2, 32)), "head_dim"),
        (dict(spec=masks.full(17)), "expects q_len"),
        (dict(impl="cuda"), "impl must be one of"),
        (dict(ad="fwd"), "ad mode must be one of"),
        (dict(interpret=False), "needs a GPU"),
        (dict(k_dtype=jnp.bfloat16), "one dtype"),
    ],
)
def test_bad_inputs_raise(bad, match):
    q = jnp.ones(bad.get("q", (1, 16, 2, 64)), jnp.float32)
    k = jnp.ones(bad.get("k", (1, 16, 2, 64)), bad.get("k_dtype", jnp.float32))
    v = jnp.ones(bad.get("v", k.shape), bad.get("k_dtype", jnp.float32))
    with pytest.raises(ValueError, match=match):
        ops.attention(
            q,
            k,
            v,
            bad.get("spec", masks.full(16)),
            impl=bad.get("impl", "triton"),
            ad=bad.get("ad", "vjp"),
            interpret=bad.get("interpret", True),
            config=SMALL,
        )


def test_kv_prefix_attention_ignores_keys_past_the_length():
    """`attention_kv_prefix`: keys [0, kv_len) of a longer buffer; later keys hold junk and never count."""
    q, k, v = rand((1, 24, 2, 64), jnp.float32), rand((1, 80, 2, 64), jnp.float32), rand((1, 80, 2, 64), jnp.float32)
    valid = 50
    junk = lambda a: a.at[:, valid:].set(1e3)
    k, v = junk(k), junk(v)
    ref = attention_reference(q, k[:, :valid], v[:, :valid], masks.full(24, valid))
    assert ops.prefix_len_can_be_traced(q, k) and not ops.prefix_len_can_be_traced(q, k, impl="triton", interpret=True)
    np.testing.assert_allclose(ops.attention_kv_prefix(q, k, v, valid), ref, rtol=1e-6, atol=1e-6)
    traced = jax.jit(lambda q, k, v, n: ops.attention_kv_prefix(q, k, v, n))(q, k, v, jnp.int32(valid))
    np.testing.assert_allclose(traced, ref, rtol=1e-5, atol=1e-5)
    kern = ops.attention_kv_prefix(q, k, v, valid, impl="triton", interpret=True, config=SMALL)
    np.testing.assert_allclose(kern, ref, rtol=1e-5, atol=1e-5)
    # gradients reach only the valid keys, like the reference on the sliced buffer
    loss = lambda k: ops.attention_kv_prefix(q, k, v, valid, impl="triton", interpret=True, config=SMALL).sum()
    gk = jax.grad(loss)(k)
    gref = jax.grad(lambda kk: attention_reference(q, kk, v[:, :valid], masks.full(24, valid)).sum())(k[:, :valid])
    np.testing.assert_allclose(gk[:, :valid], gref, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(gk[:, valid:]).max()) == 0.0
    # the static prefix mask of the kernels
    mask = masks.dense_mask(ops.prefix_spec(24, 80, valid))
    assert mask[:, :valid].all() and not mask[:, valid:].any()
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda n: ops.attention_kv_prefix(q, k, v, n, impl="triton", interpret=True))(jnp.int32(valid))
    with pytest.raises(ValueError, match=r"kv_len must be in \[1, 80\]"):
        ops.attention_kv_prefix(q, k, v, 81)
    with pytest.raises(ValueError, match="prefix_spec needs"):
        ops.prefix_spec(24, 80, 20)
