"""Mosaic-TPU flash attention kernels on CPU: Pallas TPU interpret mode and the generic
interpreter, vs the float64 reference (same checks and tolerances as the Triton kernels).

TPU interpret mode (`pltpu.InterpretParams`, simulated TPU memories, buffers NaN-filled
at allocation so unwritten outputs fail the finiteness check) is slow on CPU, so one
case per mask family runs there; the other cases use Pallas' generic interpreter
(`interpret="generic"`), which executes the same kernel code faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import masks, ops
from pallas_kernels.mosaic import MosaicConfig, mosaic_backward, mosaic_forward, mosaic_jvp
from tests.attention_helpers import TOL, f64, rand, reference_all, reference_fn, rel

SMALL = MosaicConfig.uniform(16)
MIXED = MosaicConfig(fwd=(32, 16), jvp=(16, 32), dkdv=(16, 32), dq=(32, 16))

CASES = [
    # name, spec, dtype, head_dim, config, interpret
    ("tpu_bc_chunk_f32", masks.block_causal(3, 7, 2, 1), jnp.float32, 64, SMALL, True),
    ("tpu_tf_frame_f32", masks.teacher_forcing(2, 7, 1), jnp.float32, 64, SMALL, True),
    ("gen_full_cross_bf16_d128", masks.full(20, 37), jnp.bfloat16, 128, SMALL, "generic"),
    (
        "gen_bc_kvcache_local_sink_f32",
        masks.block_causal(6, 9, 1, q_frames=2, local_attn_blocks=2, sink_blocks=1),
        jnp.float32,
        64,
        MIXED,
        "generic",
    ),
    (
        "gen_tf_chunk_local_f32",
        masks.teacher_forcing(3, 7, 2, 1, local_attn_blocks=2, sink_blocks=1),
        jnp.float32,
        64,
        MIXED,
        "generic",
    ),
]


@pytest.mark.parametrize("name,spec,dtype,d,config,interpret", CASES, ids=[c[0] for c in CASES])
def test_mosaic_kernels_match_float64_reference(name, spec, dtype, d, config, interpret):
    B, H = 1, 2
    q = rand((B, spec.q_len, H, d), dtype)
    k = rand((B, spec.kv_len, H, d), dtype)
    v = rand((B, spec.kv_len, H, d), dtype)
    do = rand(q.shape, dtype)
    tq, tk, tv = rand(q.shape, dtype), rand(k.shape, dtype), rand(v.shape, dtype)
    ro, rlse, (rdq, rdk, rdv), rto = reference_all(spec, q, k, v, do, tq, tk, tv)
    kw = dict(config=config, interpret=interpret)
    o, lse = mosaic_forward(q, k, v, spec, **kw)
    dq, dk, dv = mosaic_backward(q, k, v, o, lse, do, spec, **kw)
    o2, to, _ = mosaic_jvp(q, k, v, tq, None if interpret is True else tk, tv, spec, **kw)
    if interpret is True:  # K̇ skipped: compare with the reference for K̇ = 0
        *_, rto = reference_all(spec, q, k, v, do, tq, None, tv)
    errs = dict(
        o=rel(o, ro),
        lse=rel(lse, rlse),
        dq=rel(dq, rdq),
        dk=rel(dk, rdk),
        dv=rel(dv, rdv),
        jvp_o=rel(o2, ro),
        jvp_to=rel(to, rto),
    )
    bad = {key: e for key, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{name}: {bad} (all: {errs})"


def test_mosaic_op_wiring_jvp_and_grad():
    spec = masks.block_causal(2, 9, 1)
    q = rand((1, spec.q_len, 2, 64), jnp.float32)
    k, v, tq = rand(q.shape, jnp.float32), rand(q.shape, jnp.float32), rand(q.shape, jnp.float32)

    def op(ad):
        return lambda q, k, v: ops.attention(q, k, v, spec, impl="mosaic", ad=ad, interpret="generic", config=SMALL)

    _, t = jax.jvp(lambda q: op("jvp")(q, k, v), (q,), (tq,))
    g = jax.grad(lambda q: jnp.sum(op("vjp")(q, k, v) * v))(q)
    with jax.enable_x64(True):
        a = [jnp.asarray(f64(x)) for x in (q, k, v, tq)]
        _, rt = jax.jvp(lambda q: reference_fn(spec)(q, a[1], a[2]), (a[0],), (a[3],))
        rg = jax.grad(lambda q: jnp.sum(reference_fn(spec)(q, a[1], a[2]) * a[2]))(a[0])
    assert rel(t, rt) < 1e-5 and rel(g, rg) < 1e-5
    with pytest.raises(ValueError, match="forward mode"):
        jax.grad(lambda q: op("jvp")(q, k, v).sum())(q)
    with pytest.raises(ValueError, match="needs a TPU"):
        ops.attention(q, k, v, spec, impl="mosaic")


def test_default_tiles_follow_the_sequence_length_and_odd_lengths_match_reference():
    """Default tiles: 512 for long sequences, the smallest power of two >= 128 holding a short
    one; queries and keys are padded apart (cross-attention's 37 keys are not padded to 512)."""
    from pallas_kernels.mosaic import default_config

    assert default_config(65_520, 65_520).fwd == (512, 512)
    assert default_config(32_760, 512).fwd == (512, 512) and default_config(300, 20).fwd == (512, 128)
    cfg = default_config(300, 37)
    assert (cfg.q_multiple, cfg.kv_multiple) == (512, 128)
    spec = masks.teacher_forcing(2, 75, 1)  # 300 tokens: frames of 75 cut across tiles
    q, k, v, tq = (rand((1, 300, 2, 64), jnp.float32) for _ in range(4))
    o, to = jax.jvp(lambda q: ops.attention(q, k, v, spec, impl="mosaic", ad="jvp", interpret="generic"), (q,), (tq,))
    with jax.enable_x64(True):
        a = [jnp.asarray(f64(x)) for x in (q, k, v, tq)]
        ro, rto = jax.jvp(lambda q: reference_fn(spec)(q, a[1], a[2]), (a[0],), (a[3],))
    assert rel(o, ro) < 1e-5 and rel(to, rto) < 1e-5


def test_auto_picks_mosaic_for_tpu_and_never_the_dense_reference():
    q = jnp.ones((1, 32, 2, 64), jnp.float32)
    assert ops.resolve_impl("auto") == "xla"  # this CPU
    with ops.target_platform("tpu"):
        assert ops.current_platform() == "tpu"
        assert ops.resolve_impl("auto") == "mosaic"
        assert ops.prefix_impl(q, q) == "mosaic" and ops.prefix_impl(q, q, ad="jvp") == "mosaic"
        assert not ops.prefix_len_can_be_traced(q, q)
        with pytest.raises(ValueError, match="head_dim"):  # no silent dense fallback
            ops.attention(jnp.ones((1, 32, 2, 32)), jnp.ones((1, 32, 2, 32)), jnp.ones((1, 32, 2, 32)), masks.full(32))
        with pytest.raises(ValueError, match="needs a GPU"):
            ops.resolve_impl("triton")
    with ops.target_platform("gpu"):
        assert ops.resolve_impl("auto") == "triton"
    assert ops.current_platform() == "cpu"
    with pytest.raises(ValueError, match="target platform must be one of"):
        with ops.target_platform("tpu7"):
            pass
    with pytest.raises(ValueError, match="target_platform"):
        ops.attention(q, q, q, masks.full(32), impl="mosaic")


def test_tiles_reach_the_kernels_from_the_op_and_the_model_config(monkeypatch):
    spec = masks.block_causal(2, 9, 1)
    q, k, v = (rand((1, 18, 2, 64), jnp.float32) for _ in range(3))
    by_tiles = ops.attention(q, k, v, spec, impl="mosaic", interpret="generic", tiles=(16, 16))
    by_config = ops.attention(q, k, v, spec, impl="mosaic", interpret="generic", config=SMALL)
    assert float(jnp.abs(by_tiles - by_config).max()) == 0.0
    assert ops.kernel_config("mosaic", (32, 16)) == MosaicConfig.uniform(32, 16)
    assert ops.kernel_config("triton", (32, 16)).dq.block_k == 16
    with pytest.raises(ValueError, match="not both"):
        ops.attention(q, k, v, spec, impl="mosaic", interpret="generic", tiles=(16, 16), config=SMALL)
    with pytest.raises(ValueError, match="powers of two"):
        MosaicConfig.uniform(48)

    from crm_jax.models import partitioning
    from crm_jax.models.config import get_model_config
    from crm_jax.models.wan import AttentionPattern, apply_for, functional, init_model

    with pytest.raises(ValueError, match="attn_tiles"):
        get_model_config("tiny", attn_tiles=(100, 16))
    seen = []
    real = partitioning.attention
    monkeypatch.setattr(
        partitioning,
        "attention",
        lambda *a, **kw: (
            seen.append(kw.get("tiles")),
            real(*a, **{key: val for key, val in kw.items() if key != "tiles"}),
        )[1],
    )
    cfg = get_model_config("tiny", attn_tiles=[256, 128])
    assert cfg.runtime.attn_tiles == (256, 128)
    _, params = functional(init_model(cfg))
    x = jnp.ones((1, 2, 4, 4, cfg.in_channels))
    apply_for(cfg)(
        params,
        x,
        jnp.ones((1, 2)),
        jnp.ones((1, cfg.text_len, cfg.text_dim)),
        pattern=AttentionPattern("block_causal", 1),
    )
    assert seen and set(seen) == {(256, 128)}  # self- and cross-attention
