"""The block-sparse Hopper kernels (`pallas_kernels.mgpu.flash`: forward, JVP, backward) in Pallas' GPU interpret mode (CPU).

The kernel code that would run on an H100 -- TMA copies into the shared-memory ring, the
barriers between the producer and the two consumer warpgroups, the schedule walk over runs of
key tiles, the masked boundary tiles, query and key tiles running past the arrays -- runs here
in the interpreter (only the products with P are `jnp.dot`s, see the module docstring). Oracle:
`attention_reference` in float32 on the same (bf16 / f16) inputs: output and log-sum-exp, and
for the JVP the output's tangent from `jax.jvp` of it, for the backward dq, dk, dv from `jax.vjp` of it.
Inputs are seeded per test (`tests.attention_helpers`). Not yet run on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import masks
from pallas_kernels.mgpu import (
    BWD_CONFIG,
    HopperConfig,
    hopper_backward,
    hopper_bwd_schedule,
    hopper_forward,
    hopper_jvp,
    hopper_schedule,
)
from pallas_kernels.reference import attention_reference
from tests.attention_helpers import rand, rel

KV64 = HopperConfig(block_kv=64)

# name: (spec, B, H, D, dtype, config). Token counts per frame (24, 40, 72) that do not align
# with the 128-row query tiles or the 64-key tiles, so tiles straddle frames and blocks.
CASES = {
    "full_cross": (masks.full(200, 300), 2, 1, 64, jnp.bfloat16, KV64),
    "causal_frame": (masks.block_causal(8, 72, 1), 1, 2, 64, jnp.bfloat16, KV64),
    "causal_frame_d128_f16": (masks.block_causal(10, 40, 1), 1, 1, 128, jnp.float16, KV64),
    "causal_chunk3_odd_len": (masks.block_causal(10, 25, 3, 1), 1, 1, 64, jnp.bfloat16, KV64),
    "causal_window_sinks": (
        masks.block_causal(12, 40, 1, local_attn_blocks=3, sink_blocks=1),
        1,
        1,
        64,
        jnp.bfloat16,
        KV64,
    ),
    "causal_kv_offset_chunk3": (
        masks.block_causal(20, 24, 3, 2, q_frames=6, local_attn_blocks=2, sink_blocks=1),
        1,
        1,
        128,
        jnp.bfloat16,
        HopperConfig(),
    ),
    "teacher_forcing_frame": (masks.teacher_forcing(6, 24, 1), 1, 1, 64, jnp.bfloat16, KV64),
    "teacher_forcing_chunk3_window": (
        masks.teacher_forcing(8, 40, 3, 1, local_attn_blocks=2, sink_blocks=1),
        1,
        1,
        64,
        jnp.float16,
        HopperConfig(block_kv=64, stages=3, schedule_barrier=False),
    ),
}


def _inputs(spec, b, h, d, dtype):
    q = rand((b, spec.q_len, h, d), dtype)
    k = rand((b, spec.kv_len, h, d), dtype)
    v = rand((b, spec.kv_len, h, d), dtype)
    return q, k, v


def _reference(q, k, v, spec, scale=None):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    o, lse = attention_reference(*f32, spec, scale=scale, return_lse=True)
    return np.asarray(o), np.asarray(lse)


def _check(o, lse, q, ref_o, ref_lse):
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(lse)).all()
    assert rel(o, ref_o) < 1e-2  # bf16 / f16 output rounding is ~3e-3
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_hopper_forward_matches_reference(name):
    spec, b, h, d, dtype, cfg = CASES[name]
    cls = masks.tile_classes(spec, 2 * cfg.block_q, cfg.block_kv)
    assert (cls == 2).any()  # every case has masked boundary tiles
    q, k, v = _inputs(spec, b, h, d, dtype)
    o, lse = hopper_forward(q, k, v, spec, config=cfg, interpret=True)
    _check(o, lse, q, *_reference(q, k, v, spec))


def test_cases_cover_unmasked_runs_and_gaps():
    """The cases walk unmasked (full) tiles, and rows whose runs skip tiles between them."""
    full = gaps = 0
    for spec, *_, cfg in CASES.values():
        cls = masks.tile_classes(spec, 2 * cfg.block_q, cfg.block_kv)
        full += int((cls == 1).sum())
        for row in cls != 0:
            cols = np.flatnonzero(row)
            gaps += int(len(cols) and cols[-1] - cols[0] + 1 > len(cols))
    assert full >= 10 and gaps >= 2


@pytest.mark.parametrize("name", ["causal_window_sinks", "teacher_forcing_chunk3_window", "full_cross"])
def test_schedule_is_tile_runs(name):
    """The schedule arrays decode to exactly the visited tiles of `masks.tile_classes` at the
    CTA's tile (2 * block_q rows), masked exactly where the tile is partial."""
    spec, *_, cfg = CASES[name]
    start, end, runs = hopper_schedule(spec, cfg)
    cls = masks.tile_classes(spec, 2 * cfg.block_q, cfg.block_kv)
    seen = np.zeros_like(cls)
    for row in range(cls.shape[0]):
        lo = 0
        for r in range(runs):
            hi = int(end[row * runs + r])
            first, masked = divmod(int(start[row * runs + r]), 2)
            for step in range(lo, hi):
                col = first + step - lo
                assert seen[row, col] == 0
                seen[row, col] = 2 if masked else 1
            lo = hi
    np.testing.assert_array_equal(seen, cls)
    assert int(end.reshape(-1, runs)[:, -1].sum()) == masks.tile_runs(spec, 2 * cfg.block_q, cfg.block_kv).visited_pairs


@pytest.mark.parametrize("name", ["causal_window_sinks", "causal_kv_offset_chunk3"])
def test_skipped_key_tiles_are_never_read(name):
    """For each query tile, NaN in K and V of every key tile its schedule skips: that tile's
    output rows stay finite and equal the reference (a visited tile, even masked, would turn
    NaN through 0 * NaN in PV)."""
    spec, b, h, d, dtype, cfg = CASES[name]
    bq, bk = 2 * cfg.block_q, cfg.block_kv
    cls = masks.tile_classes(spec, bq, bk)
    q, k, v = _inputs(spec, b, h, d, dtype)
    ref_o, ref_lse = _reference(q, k, v, spec)
    poisoned = 0
    for row in range(cls.shape[0]):
        skipped = np.repeat(cls[row] == 0, bk)[: spec.kv_len]
        if not skipped.any():
            continue
        poisoned += 1
        nan = jnp.asarray(skipped)[None, :, None, None]
        kp, vp = jnp.where(nan, jnp.nan, k), jnp.where(nan, jnp.nan, v)
        o, lse = hopper_forward(q, kp, vp, spec, config=cfg, interpret=True)
        rows = slice(row * bq, min((row + 1) * bq, spec.q_len))
        assert rel(o[:, rows], ref_o[:, rows]) < 1e-2
        np.testing.assert_allclose(np.asarray(lse[..., rows]), ref_lse[..., rows], rtol=1e-5, atol=1e-4)
    assert poisoned >= 1


def test_hopper_forward_scale():
    spec = masks.block_causal(4, 40, 1)
    q, k, v = _inputs(spec, 1, 1, 64, jnp.bfloat16)
    o, lse = hopper_forward(q, k, v, spec, scale=0.3, config=KV64, interpret=True)
    _check(o, lse, q, *_reference(q, k, v, spec, scale=0.3))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dtype=jnp.float32), "bfloat16 or float16"),
        (dict(d=32), "head_dim in"),
        (dict(k_heads=3), "alike"),
        (dict(q=(1, 64, 2)), "expects q"),
        (dict(spec=masks.full(64, 64)), "expects q_len=64, kv_len=64"),
        (dict(spec="full"), "MaskSpec"),
        (dict(config=HopperConfig(block_kv=256, stages=4)), "shared memory"),
        (dict(scale=-1.0), "positive score scale"),
    ],
)
def test_hopper_forward_bad_input_raises(bad, match):
    d = bad.get("d", 64)
    q = jnp.ones(bad.get("q", (1, 64, 2, d)), bad.get("dtype", jnp.bfloat16))
    k = jnp.ones((1, 128, bad.get("k_heads", 2), d), bad.get("dtype", jnp.bfloat16))
    spec = bad.get("spec", masks.full(64, 128))
    with pytest.raises(ValueError, match=match):
        hopper_forward(q, k, k, spec, scale=bad.get("scale"), config=bad.get("config"), interpret=True)


@pytest.mark.parametrize("kw,match", [(dict(block_q=96), "multiples of 64"), (dict(stages=1), "stages")])
def test_hopper_config_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        HopperConfig(**kw)


# name: (forward case, which tangents (tq, tk, tv) are given, config).
JVP_CASES = {
    "causal_window_sinks_all": ("causal_window_sinks", (True, True, True), None),
    "teacher_forcing_chunk3_d128_all": ("teacher_forcing_chunk3_window", (True, True, True), None),
    "full_cross_tv_only": ("full_cross", (False, False, True), None),
    "causal_kv_offset_tq_tk": ("causal_kv_offset_chunk3", (True, True, False), HopperConfig(block_kv=64, stages=3)),
    "causal_frame_tk_only_nosched": (
        "causal_frame",
        (False, True, False),
        HopperConfig(block_kv=64, schedule_barrier=False),
    ),
}


@pytest.mark.parametrize("name", list(JVP_CASES))
def test_hopper_jvp_matches_reference(name):
    case, given, cfg = JVP_CASES[name]
    spec, b, h, d, dtype, _ = CASES[case]
    if name == "teacher_forcing_chunk3_d128_all":
        d, dtype = 128, jnp.bfloat16
    q, k, v = _inputs(spec, b, h, d, dtype)
    tans = [rand(x.shape, dtype) if g else None for g, x in zip(given, (q, k, v))]
    o, to, lse = hopper_jvp(q, k, v, *tans, spec, config=cfg, interpret=True)
    ref_o, ref_lse = _reference(q, k, v, spec)
    _check(o, lse, q, ref_o, ref_lse)
    assert to.shape == q.shape and to.dtype == q.dtype
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    t32 = tuple(jnp.zeros_like(x) if t is None else t.astype(jnp.float32) for t, x in zip(tans, f32))
    _, ref_to = jax.jvp(lambda q, k, v: attention_reference(q, k, v, spec), tuple(f32), t32)
    assert rel(to, ref_to) < 1e-2, rel(to, ref_to)  # measured ~2.4e-3


def test_hopper_jvp_skipped_key_tiles_are_never_read():
    """NaN in K, V, tK and tV of the key tiles the (single) query tile skips: all finite."""
    spec, b, h, d, dtype, _ = CASES["causal_kv_offset_chunk3"]
    cfg = HopperConfig(block_kv=64)
    cls = masks.tile_classes(spec, 2 * cfg.block_q, cfg.block_kv)
    assert cls.shape[0] == 2 and (cls == 0).all(axis=0).any()
    q, k, v = _inputs(spec, b, h, d, dtype)
    tq, tk, tv = (rand(x.shape, dtype) for x in (q, k, v))
    nan = jnp.asarray(np.repeat((cls == 0).all(axis=0), cfg.block_kv)[: spec.kv_len])[None, :, None, None]
    poison = [jnp.where(nan, jnp.nan, x) for x in (k, v, tk, tv)]
    o, to, lse = hopper_jvp(q, poison[0], poison[1], tq, poison[2], poison[3], spec, config=cfg, interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    t32 = tuple(x.astype(jnp.float32) for x in (tq, tk, tv))
    ref_o, ref_to = jax.jvp(lambda q, k, v: attention_reference(q, k, v, spec), tuple(f32), t32)
    assert rel(o, ref_o) < 1e-2 and rel(to, ref_to) < 1e-2


@pytest.mark.parametrize(
    "which,match",
    [("tq_shape", "tangent tq"), ("tv_dtype", "tangent tv"), ("smem", "shared memory for head_dim 128 in the JVP")],
)
def test_hopper_jvp_bad_input_raises(which, match):
    q = jnp.ones((1, 64, 1, 128), jnp.bfloat16)
    tq = jnp.ones((1, 32, 1, 128), jnp.bfloat16) if which == "tq_shape" else None
    tv = jnp.ones((1, 64, 1, 128), jnp.float16) if which == "tv_dtype" else q
    cfg = HopperConfig() if which == "smem" else None  # 128-key tiles: four rings do not fit
    with pytest.raises(ValueError, match=match):
        hopper_jvp(q, q, q, tq, q, tv, masks.full(64), config=cfg, interpret=True)


@pytest.mark.parametrize(
    "name", ["full_cross", "causal_window_sinks", "causal_kv_offset_chunk3", "teacher_forcing_frame"]
)
@pytest.mark.parametrize("d,dtype", [(64, jnp.float16), (128, jnp.bfloat16)])
def test_kernels_lower_to_mosaic_gpu(name, d, dtype):
    """The GPU code path (wgmma with a register operand for PV, no interpreter) goes through
    Pallas' Mosaic GPU lowering from this CPU host -- layout inference, TMA descriptors, the
    Mosaic GPU dialect lowering -- for the forward and the JVP with all tangents; ptxas and the
    run on a GPU are not covered. Ragged lengths (300 keys) take the padded path."""
    spec = CASES[name][0]
    q = jax.ShapeDtypeStruct((2, spec.q_len, 2, d), dtype)
    k = jax.ShapeDtypeStruct((2, spec.kv_len, 2, d), dtype)
    fwd = jax.jit(lambda q, k, v: hopper_forward(q, k, v, spec))
    jvp = jax.jit(lambda q, k, v: hopper_jvp(q, k, v, q, k, v, spec))
    for f in (fwd, jvp):
        text = f.trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
        assert "custom_call @mosaic_gpu" in text


# name: (forward case, backward config: None is BWD_CONFIG). The lengths are ragged (not
# multiples of the tiles), so the dK/dV kernel's query tiles run past the arrays too.
BWD_CASES = {
    "full_cross": ("full_cross", None),
    "causal_frame": ("causal_frame", HopperConfig(block_kv=128)),
    "causal_frame_d128_f16": ("causal_frame_d128_f16", None),
    "causal_chunk3_odd_len": ("causal_chunk3_odd_len", HopperConfig(block_kv=64, stages=3)),
    "causal_window_sinks": ("causal_window_sinks", None),
    "causal_kv_offset_chunk3": ("causal_kv_offset_chunk3", None),
    "teacher_forcing_frame": ("teacher_forcing_frame", None),
    "teacher_forcing_chunk3_window": ("teacher_forcing_chunk3_window", None),
}


def _bwd_reference(q, k, v, do, spec):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, spec), *f32)
    return [np.asarray(g) for g in vjp(do.astype(jnp.float32))]


@pytest.mark.parametrize("name", list(BWD_CASES))
def test_hopper_backward_matches_reference(name):
    case, cfg = BWD_CASES[name]
    spec, b, h, d, dtype, _ = CASES[case]
    cfg = BWD_CONFIG if cfg is None else cfg
    cls = masks.tile_classes(spec, cfg.block_kv, 2 * cfg.block_q).T  # the dK/dV kernel's tiles
    assert (cls == 2).any()
    q, k, v = _inputs(spec, b, h, d, dtype)
    do = rand(q.shape, dtype)
    o, lse = hopper_forward(q, k, v, spec, config=cfg, interpret=True)
    grads = hopper_backward(q, k, v, o, lse, do, spec, config=cfg, interpret=True)
    for g, x, ref in zip(grads, (q, k, v), _bwd_reference(q, k, v, do, spec)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert rel(g, ref) < 1e-2, rel(g, ref)  # measured ~2.4e-3


def test_hopper_backward_scale():
    spec = masks.block_causal(4, 40, 1)
    q, k, v = _inputs(spec, 1, 1, 64, jnp.bfloat16)
    do = rand(q.shape, jnp.bfloat16)
    o, lse = hopper_forward(q, k, v, spec, scale=0.3, config=KV64, interpret=True)
    grads = hopper_backward(q, k, v, o, lse, do, spec, scale=0.3, interpret=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    _, vjp = jax.vjp(lambda q, k, v: attention_reference(q, k, v, spec, scale=0.3), *f32)
    for g, ref in zip(grads, vjp(do.astype(jnp.float32))):
        assert rel(g, ref) < 1e-2


@pytest.mark.parametrize("name", ["causal_window_sinks", "teacher_forcing_chunk3_window"])
def test_bwd_schedule_is_transposed_tile_runs(name):
    """The dK/dV schedule decodes to exactly the query tiles each key tile's keys are seen
    from (`masks.tile_classes` transposed, key tiles of 2 * block_q), masked where partial."""
    spec = CASES[name][0]
    cfg = BWD_CONFIG
    start, end, runs = hopper_bwd_schedule(spec, cfg)
    cls = masks.tile_classes(spec, cfg.block_kv, 2 * cfg.block_q).T
    seen = np.zeros_like(cls)
    for row in range(cls.shape[0]):
        lo = 0
        for r in range(runs):
            hi = int(end[row * runs + r])
            first, masked = divmod(int(start[row * runs + r]), 2)
            seen[row, first : first + hi - lo] = 2 if masked else 1
            lo = hi
    np.testing.assert_array_equal(seen, cls)


def test_hopper_backward_skipped_tiles_are_never_read():
    """dQ: NaN in K and V of the key tiles a query tile skips; dK/dV: NaN in Q, dO, O (so
    delta) and LSE of the query tiles a key tile skips. The gradients of that tile stay
    finite and equal the reference (a visited tile would turn them NaN)."""
    spec, b, h, d, dtype, _ = CASES["causal_kv_offset_chunk3"]
    cfg = BWD_CONFIG
    q, k, v = _inputs(spec, b, h, d, dtype)
    do = rand(q.shape, dtype)
    o, lse = hopper_forward(q, k, v, spec, config=cfg, interpret=True)
    ref_dq, ref_dk, ref_dv = _bwd_reference(q, k, v, do, spec)
    nan = jnp.nan
    poisoned = 0
    bq, bk = 2 * cfg.block_q, cfg.block_kv
    for row, skip in enumerate(masks.tile_classes(spec, bq, bk) == 0):  # query tiles of the dQ kernel
        if not skip.any():
            continue
        poisoned += 1
        bad = jnp.asarray(np.repeat(skip, bk)[: spec.kv_len])[None, :, None, None]
        dq, _, _ = hopper_backward(
            q, jnp.where(bad, nan, k), jnp.where(bad, nan, v), o, lse, do, spec, config=cfg, interpret=True
        )
        rows = slice(row * bq, (row + 1) * bq)
        assert rel(dq[:, rows], ref_dq[:, rows]) < 1e-2
    for row, skip in enumerate(masks.tile_classes(spec, bk, bq).T == 0):  # key tiles of the dK/dV kernel
        if not skip.any():
            continue
        poisoned += 1
        bad_rows = np.repeat(skip, bk)[: spec.q_len]
        bad = jnp.asarray(bad_rows)[None, :, None, None]
        qp, op, dop = (jnp.where(bad, nan, x) for x in (q, o, do))
        lsep = jnp.where(jnp.asarray(bad_rows)[None, None, :], nan, lse)
        _, dk, dv = hopper_backward(qp, k, v, op, lsep, dop, spec, config=cfg, interpret=True)
        rows = slice(row * bq, (row + 1) * bq)
        for g, ref in ((dk, ref_dk), (dv, ref_dv)):
            if np.any(ref[:, rows]):
                assert rel(g[:, rows], ref[:, rows]) < 1e-2
            else:  # keys no query sees (outside every window): exact zeros, no NaN
                assert not np.asarray(g[:, rows], np.float32).any()
    assert poisoned >= 3


@pytest.mark.parametrize(
    "which,match",
    [
        ("o", "o \\(1, 32, 1, 128\\)"),
        ("do", "do .* must be shaped"),
        ("lse", "lse must be float32"),
        ("smem", "shared memory for head_dim 128 in the backward"),
    ],
)
def test_hopper_backward_bad_input_raises(which, match):
    q = jnp.ones((1, 64, 1, 128), jnp.bfloat16)
    lse = jnp.zeros((1, 1, 64), jnp.float16 if which == "lse" else jnp.float32)
    o = q[:, :32] if which == "o" else q
    do = q.astype(jnp.float16) if which == "do" else q
    cfg = HopperConfig(block_q=128) if which == "smem" else None  # fits the forward, not the backward
    with pytest.raises(ValueError, match=match):
        hopper_backward(q, q, q, o, lse, do, masks.full(64), config=cfg, interpret=True)


@pytest.mark.parametrize(
    "name", ["full_cross", "causal_window_sinks", "causal_kv_offset_chunk3", "teacher_forcing_frame"]
)
@pytest.mark.parametrize("d,dtype", [(64, jnp.float16), (128, jnp.bfloat16)])
def test_backward_lowers_to_mosaic_gpu(name, d, dtype):
    """As `test_kernels_lower_to_mosaic_gpu`, for the backward's two kernels (wgmma with the
    register operands P^T, dS^T and dS, the LSE / delta rows through the ring)."""
    spec = CASES[name][0]
    q = jax.ShapeDtypeStruct((2, spec.q_len, 2, d), dtype)
    k = jax.ShapeDtypeStruct((2, spec.kv_len, 2, d), dtype)
    lse = jax.ShapeDtypeStruct((2, 2, spec.q_len), jnp.float32)
    bwd = jax.jit(lambda q, k, v, o, lse, do: hopper_backward(q, k, v, o, lse, do, spec))
    text = bwd.trace(q, k, k, q, lse, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2
