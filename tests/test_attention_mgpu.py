"""The Hopper KV-cache attention kernel (`pallas_kernels.mgpu`) in Pallas' GPU interpret mode (CPU).

The kernel code that runs on the GPU -- TMA copies into the shared-memory ring, the barriers
between the producer and the two consumer warpgroups, the traced valid length, the masked
tail tile, key splits and their log-sum-exp merge, query and key tiles running past the
arrays -- runs here in the interpreter (which also checks that every barrier phase is
observed); only the PV product is a `jnp.dot` there (see the module docstring). Reference:
float64 softmax attention over the valid keys; keys past the length hold junk (1e3), so
reading them fails the comparison. Inputs are seeded per test (`tests.attention_helpers`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crm_jax.models.config import TINY
from crm_jax.models.wan import AttentionPattern, WanModel, functional
from crm_jax.sampling import StreamingSampler
from pallas_kernels import ops
from pallas_kernels.mgpu import PrefixConfig, default_config, merge_splits, prefix_attention
from tests.attention_helpers import prefix_reference, rand, rel


def _inputs(b, lq, s, h, d, dtype, valid):
    q, k, v = rand((b, lq, h, d), dtype), rand((b, s, h, d), dtype), rand((b, s, h, d), dtype)
    junk = lambda a: a.at[:, valid:].set(1e3)  # noqa: E731
    return q, junk(k), junk(v)


# (B, Lq, S, H, D, dtype, config, kv_lens): ragged Lq (not a multiple of the 128-row CTA tile)
# and S (the last key tile runs past the buffer), tile-aligned and unaligned lengths, splits
# that leave a range empty (kv_len 70 with 3 splits of 64-key tiles), a deeper ring.
CASES = {
    "bf16_d64_s1": (1, 100, 300, 2, 64, jnp.bfloat16, PrefixConfig(block_kv=64), (300, 128, 77)),
    "bf16_d128_s3": (2, 72, 300, 1, 128, jnp.bfloat16, PrefixConfig(block_kv=64, splits=3), (70, 300)),
    "f16_d64_s2_st3": (1, 130, 256, 2, 64, jnp.float16, PrefixConfig(block_kv=64, stages=3, splits=2), (256, 190)),
    "bf16_d64_kv128_nosched": (1, 64, 384, 1, 64, jnp.bfloat16, PrefixConfig(schedule_barrier=False), (200,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prefix_kernel_matches_reference(name):
    b, lq, s, h, d, dtype, cfg, lens = CASES[name]
    f = jax.jit(lambda q, k, v, n: prefix_attention(q, k, v, n, config=cfg, interpret=True))
    for kv_len in lens:  # one compile: the length is traced
        q, k, v = _inputs(b, lq, s, h, d, dtype, kv_len)
        out = f(q, k, v, jnp.int32(kv_len))
        assert out.shape == q.shape and out.dtype == q.dtype
        err = rel(out, prefix_reference(q, k, v, kv_len))
        assert err < 1e-2, (name, kv_len, err)  # bf16/f16 output rounding is ~3e-3


def test_prefix_kernel_static_length_and_scale():
    q, k, v = _inputs(1, 64, 192, 1, 64, jnp.bfloat16, 150)
    out = prefix_attention(q, k, v, 150, scale=0.3, config=PrefixConfig(block_kv=64), interpret=True)
    assert rel(out, prefix_reference(q, k, v, 150, scale=0.3)) < 1e-2


def test_merge_splits_equals_one_softmax():
    """Partial outputs over disjoint key ranges, merged by log-sum-exp, give the whole softmax;
    an empty range (lse = -inf, output 0) contributes nothing."""
    q, k, v = rand((1, 5, 2, 8), jnp.float32), rand((1, 12, 2, 8), jnp.float32), rand((1, 12, 2, 8), jnp.float32)
    parts, lses = [], []
    for lo, hi in ((0, 5), (5, 12), (12, 12)):
        if hi > lo:
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k[:, lo:hi]) * 8**-0.5
            lses.append(jax.nn.logsumexp(s, axis=-1))
            parts.append(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v[:, lo:hi]))
        else:
            lses.append(jnp.full((1, 2, 5), -jnp.inf))
            parts.append(jnp.zeros((1, 5, 2, 8)))
    merged = merge_splits(jnp.stack(parts), jnp.stack(lses))
    np.testing.assert_allclose(merged, prefix_reference(q, k, v, 12), rtol=1e-5, atol=1e-5)


def test_default_config_fills_waves():
    one_chunk = default_config((1, 4680, 12, 128), (1, 32760, 12, 128), sms=132)  # 444 CTAs: 3.4 waves
    assert one_chunk.splits == 2  # 888: 6.7 of 7
    assert default_config((1, 32760, 12, 128), (1, 32760, 12, 128), sms=132).splits == 1
    for shape in ((1, 1560, 12, 128), (2, 4680, 40, 128), (1, 64, 2, 64)):
        ctas = shape[0] * shape[2] * -(-shape[1] // 128)
        fill = {s: ctas * s / 132 / np.ceil(ctas * s / 132) for s in (1, 2, 3, 4)}
        good = [s for s, f in fill.items() if f >= 0.9]
        assert default_config(shape, shape, sms=132).splits == (good[0] if good else max(fill, key=fill.get))
    assert default_config((1, 64, 2, 64), (1, 64, 2, 64), sms=132).splits == 4  # 2 CTAs: split most


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dtype=jnp.float32), "bfloat16 or float16"),
        (dict(d=32), "head_dim in"),
        (dict(k_heads=3), "alike"),
        (dict(q=(1, 64, 2)), "expects q"),
        (dict(config=PrefixConfig(block_kv=256, stages=4)), "shared memory"),
        (dict(kv_len=0), r"kv_len must be in \[1, 128\]"),
        (dict(scale=-1.0), "positive score scale"),
    ],
)
def test_prefix_kernel_bad_input_raises(bad, match):
    d = bad.get("d", 64)
    q = jnp.ones(bad.get("q", (1, 64, 2, d)), bad.get("dtype", jnp.bfloat16))
    k = jnp.ones((1, 128, bad.get("k_heads", 2), d), bad.get("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=match):
        prefix_attention(
            q, k, k, bad.get("kv_len", 64), scale=bad.get("scale"), config=bad.get("config"), interpret=True
        )


@pytest.mark.parametrize(
    "kw,match", [(dict(block_q=96), "multiples of 64"), (dict(stages=1), "stages"), (dict(splits=0), "splits")]
)
def test_prefix_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        PrefixConfig(**kw)


def test_ops_prefix_mgpu_forward_and_gradient():
    """`ops.attention_kv_prefix(impl="mgpu")`: the kernel forward; its gradient is the reference's
    (cuDNN's on a GPU, the XLA reference in interpret mode) and reaches only the valid keys."""
    q, k, v = _inputs(1, 64, 192, 2, 64, jnp.bfloat16, 150)
    assert ops.prefix_len_can_be_traced(q, k, impl="mgpu", interpret=True)
    out = jax.jit(
        lambda q, k, v, n: ops.attention_kv_prefix(
            q, k, v, n, impl="mgpu", interpret=True, config=PrefixConfig(block_kv=64)
        )
    )(q, k, v, jnp.int32(150))
    assert rel(out, prefix_reference(q, k, v, 150)) < 1e-2
    g = rand(q.shape, jnp.float32)
    loss = lambda impl: (
        lambda k: (
            ops.attention_kv_prefix(
                q,
                k,
                v,
                150,
                impl=impl,
                interpret=True,  # noqa: E731
                config=PrefixConfig(block_kv=64) if impl == "mgpu" else None,
            ).astype(jnp.float32)
            * g
        ).sum()
    )
    gk, gref = jax.grad(loss("mgpu"))(k), jax.grad(loss("xla"))(k)
    assert rel(gk, np.asarray(gref, np.float64)) < 5e-3  # bf16 gradients of two XLA formulations
    assert float(jnp.abs(gk[:, 150:].astype(jnp.float32)).max()) == 0.0 < float(jnp.abs(gk.astype(jnp.float32)).max())


@pytest.mark.parametrize("q_len,s", [(150, 300), (64, 1560)])
def test_prefix_kernel_lowers_to_mosaic_gpu(q_len, s):
    """The GPU code path (no interpreter) goes through Pallas' Mosaic GPU lowering from this CPU
    host for ragged lengths (padded to multiples of 8) and aligned ones, with a traced kv_len;
    ptxas and the run on a GPU are not covered."""
    q = jax.ShapeDtypeStruct((1, q_len, 2, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, s, 2, 64), jnp.bfloat16)
    n = jax.ShapeDtypeStruct((), jnp.int32)
    f = jax.jit(lambda q, k, v, n: prefix_attention(q, k, v, n, config=PrefixConfig(block_kv=64)))
    text = f.trace(q, k, k, n).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @mosaic_gpu" in text


def test_ops_prefix_mgpu_errors():
    q = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="sm_90"):  # CPU, not interpret
        ops.attention_kv_prefix(q, q, q, 64, impl="mgpu")
    with pytest.raises(ValueError, match="ad='vjp'"):
        ops.attention_kv_prefix(q, q, q, 64, impl="mgpu", ad="jvp", interpret=True)
    with pytest.raises(ValueError, match="PrefixConfig"):
        ops.attention_kv_prefix(q, q, q, 64, impl="mgpu", interpret=True, config=ops.FlashConfig())
    assert ops.prefix_impl(q, q) == "xla"  # auto on the CPU


def test_streaming_with_mgpu_cache_attention_matches_xla():
    """The sampler with `cache_attn_impl="mgpu"` (one compile for every cache length), and with the
    cross-attention on the same kernel too (`cross_attn_impl="mgpu"`), generates the video the XLA
    attention does, to bf16 rounding (bf16 model, head_dim 64, chunk-wise, 2 steps, noisy context,
    3 chunks)."""
    base = TINY.replace(dim=128, num_heads=2, num_layers=2, dtype="bfloat16", param_dtype="float32")
    ctx = jax.random.normal(jax.random.key(1), (1, base.text_len, base.text_dim))
    videos = {}
    for impl in ("xla", "mgpu", "mgpu_cross"):
        cross = "mgpu" if impl == "mgpu_cross" else "auto"
        cfg = base.replace(cache_attn_impl=impl.removesuffix("_cross"), cross_attn_impl=cross, attn_interpret=True)
        apply, params = functional(WanModel(cfg, rngs=nnx.Rngs(0)))  # the same weights
        s = StreamingSampler(apply, params, cfg, AttentionPattern("block_causal", 2), (4, 4), 1, 2, "noisy")
        assert s.traced_cache_len
        videos[impl] = jax.block_until_ready(s.generate(jax.random.key(3), ctx, 6))
        assert s.compiled_count() >= 1
    a = np.asarray(videos["xla"], np.float64)
    for impl in ("mgpu", "mgpu_cross"):
        b = np.asarray(videos[impl], np.float64)
        assert np.isfinite(b).all()
        assert np.abs(a - b).max() <= 3e-2 * np.abs(a).mean(), (impl, np.abs(a - b).max())
    assert np.abs(np.asarray(videos["mgpu_cross"], np.float64) - np.asarray(videos["mgpu"], np.float64)).max() > 0
