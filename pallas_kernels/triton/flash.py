"""Block-sparse flash attention: forward (+LSE), backward (dQ, dK, dV) and JVP.

Pallas kernels written for the Triton lowering of `pl.pallas_call` (GPU); the
same code runs with `interpret=True` on CPU, which is how the tests check it.

Layout: q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`, o `[B, Lq, H, D]`,
lse `[B, H, Lq]` (natural log of the sum of exp of the scaled scores).

Every kernel walks only the non-empty tiles of the attention pattern, taken from
`masks.tile_schedule`: for each row tile (query tile for forward/JVP/dQ, key
tile for dK/dV) it loops over `full_count` tiles needing no element-wise mask,
then over `part_count` tiles that are masked with `kernel_allowed`. The int32
schedule arrays are kernel inputs. Sequence lengths are padded to a multiple of
the largest tile outside the kernels (the mask never allows padded positions)
and outputs are sliced back.

Numerics: scores are kept in the log2 domain (`s * scale * log2(e)`), softmax
statistics and all accumulators are float32; MXU/tensor-core operands stay in
the input dtype (bf16 or fp32; fp32 dots use precision HIGHEST = IEEE fp32, not
tf32).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    accumulate,
    check_inputs,
    dot,
    online_softmax_step,
    padded,
    precision,
    running_sum,
    softmax_probs,
    tile_mask,
)
from pallas_kernels.masks import MaskSpec, tile_schedule

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class Tiles:
    """Launch parameters of one kernel.

    block_q: query tile (rows of the grid for forward/JVP/dQ; inner loop tile for dK/dV).
    block_k: key tile (inner loop tile for forward/JVP/dQ; rows of the grid for dK/dV).
    """

    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            b = getattr(self, name)
            if b < 16 or b & (b - 1):
                raise ValueError(f"Tiles.{name} must be a power of two >= 16, got {b}")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Tile sizes / warps / pipeline stages of the four kernels (hashable, static)."""

    # Defaults from a tile sweep on an H200 (experiments/results/bench_attention*.json).
    fwd: Tiles = Tiles(128, 64, 4, 4)
    jvp: Tiles = Tiles(64, 64, 4, 3)
    dkdv: Tiles = Tiles(64, 64, 4, 2)
    dq: Tiles = Tiles(128, 32, 4, 3)
    # Walk the full (unmasked) tiles of each row as contiguous ranges of tile
    # indices (`fori_loop(lo, hi)`, addresses computed from the loop index) instead
    # of through the index list (one dependent scalar load per tile).
    full_ranges: bool = True

    @property
    def pad_multiple(self) -> int:
        return max(max(t.block_q, t.block_k) for t in (self.fwd, self.jvp, self.dkdv, self.dq))

    @staticmethod
    def uniform(block: int, num_warps: int = 4, num_stages: int = 2) -> FlashConfig:
        t = Tiles(block, block, num_warps, num_stages)
        return FlashConfig(t, t, t, t)


FP32_CONFIG = FlashConfig(Tiles(64, 32, 4, 2), Tiles(64, 32, 4, 1), Tiles(32, 64, 4, 2), Tiles(64, 32, 4, 2))


def default_config(dtype=jnp.bfloat16) -> FlashConfig:
    """Hopper defaults; float32 operands take smaller tiles (shared memory)."""
    return FP32_CONFIG if jnp.dtype(dtype) == jnp.float32 else FlashConfig()


# ----------------------------------------------------------------------------- schedules
@functools.lru_cache(maxsize=256)
def _schedule_np(spec: MaskSpec, bq: int, bk: int, transpose: bool, rows: int):
    """Schedule arrays padded to `rows` rows (extra rows: zero counts), widths >= 1."""
    s = tile_schedule(spec, bq, bk, transpose=transpose)
    out = []
    for idx, cnt in ((s.full_idx, s.full_count), (s.part_idx, s.part_count)):
        r0, w = idx.shape
        if r0 > rows:
            raise AssertionError(f"schedule has {r0} rows > grid rows {rows}")
        idx_p = np.zeros((rows, max(w, 1)), np.int32)
        idx_p[:r0, :w] = idx
        cnt_p = np.zeros((rows,), np.int32)
        cnt_p[:r0] = cnt
        out += [idx_p, cnt_p]
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _ranges_np(spec: MaskSpec, bq: int, bk: int, transpose: bool, rows: int):
    """Full tiles of each row as contiguous ranges: lo, hi `[rows, R]` int32 (hi > lo
    for real ranges, lo == hi == 0 padding), R = the most ranges of any row."""
    fi, fc = _schedule_np(spec, bq, bk, transpose, rows)[:2]
    per_row = []
    for r in range(rows):
        cols = fi[r, : fc[r]]
        runs = []
        for c in cols:
            if runs and c == runs[-1][1]:
                runs[-1][1] = c + 1
            else:
                runs.append([int(c), int(c) + 1])
        per_row.append(runs)
    n = max(1, max(len(x) for x in per_row))
    lo = np.zeros((rows, n), np.int32)
    hi = np.zeros((rows, n), np.int32)
    for r, runs in enumerate(per_row):
        for j, (a, b) in enumerate(runs):
            lo[r, j], hi[r, j] = a, b
    return lo, hi


def _schedule(spec, bq, bk, transpose, rows, ranges=False):
    """Kernel schedule inputs: (full_idx, full_count, part_idx, part_count), or with
    `ranges` (full_lo, full_hi, part_idx, part_count)."""
    arrs = _schedule_np(spec, bq, bk, transpose, rows)
    if ranges:
        arrs = _ranges_np(spec, bq, bk, transpose, rows) + arrs[2:]
    return tuple(jnp.asarray(a) for a in arrs)


def _whole(shape):
    """BlockSpec covering a whole (small, int32) array, same block for every grid point."""
    nd = len(shape)
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * nd)


def _row_map(reverse: bool, rows: int):
    """Grid axis 0 -> row tile; heavy (late) rows first when `reverse`."""
    if reverse:
        return lambda i: rows - 1 - i
    return lambda i: i


def _run_schedule(row, fi_ref, fc_ref, pi_ref, pc_ref, body, carry):
    """fori_loop over the full tiles (unmasked) then the partial tiles (masked).

    With range schedules (`fc_ref` 2-D) `fi_ref`/`fc_ref` hold lo/hi per range."""
    if len(fc_ref.shape) == 2:
        for j in range(fc_ref.shape[1]):
            carry = lax.fori_loop(fi_ref[row, j], fc_ref[row, j], lambda col, c: body(col, c, False), carry)
    else:
        carry = lax.fori_loop(0, fc_ref[row], lambda t, c: body(fi_ref[row, t], c, False), carry)
    carry = lax.fori_loop(0, pc_ref[row], lambda t, c: body(pi_ref[row, t], c, True), carry)
    return carry


def _compiler_params(t: Tiles):
    return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


# ----------------------------------------------------------------------------- forward
def _fwd_kernel(fi_ref, fc_ref, pi_ref, pc_ref, q_ref, k_ref, v_ref, *refs, spec, scale, bq, bk, rows, reverse, poison):
    if poison:
        refs = refs[2:]
    o_ref, lse_ref = refs
    row = _row_map(reverse, rows)(pl.program_id(0))
    prec = precision(q_ref.dtype)
    q = q_ref[...]
    d = q.shape[-1]
    c = scale * LOG2E

    def body(col, carry, masked):
        acc, m, l = carry
        start = pl.multiple_of(col * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot(q, k, prec, trans_b=True) * c
        if masked:
            s = jnp.where(tile_mask(spec, row * bq, bq, start, bk), s, -jnp.inf)
        m_new, alpha, p = online_softmax_step(m, s, jnp.exp2)
        l = running_sum(l * alpha, p)
        acc = accumulate(acc * alpha[:, None], p, v, prec)
        return acc, m_new, l

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -1e30, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = _run_schedule(row, fi_ref, fc_ref, pi_ref, pc_ref, body, init)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


# ----------------------------------------------------------------------------- JVP
def _jvp_kernel(
    fi_ref, fc_ref, pi_ref, pc_ref, *refs, spec, scale, bq, bk, rows, reverse, has_tq, has_tk, has_tv, poison
):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    tq_ref = refs.pop(0) if has_tq else None
    tk_ref = refs.pop(0) if has_tk else None
    tv_ref = refs.pop(0) if has_tv else None
    if poison:
        refs = refs[3:]
    o_ref, to_ref, lse_ref = refs
    row = _row_map(reverse, rows)(pl.program_id(0))
    prec = precision(q_ref.dtype)
    q = q_ref[...]
    tq = tq_ref[...] if has_tq else None
    d = q.shape[-1]
    c = scale * LOG2E
    has_ts = has_tq or has_tk

    def body(col, carry, masked):
        acc, acct, m, l, r = carry
        start = pl.multiple_of(col * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot(q, k, prec, trans_b=True) * c
        if masked:
            s = jnp.where(tile_mask(spec, row * bq, bq, start, bk), s, -jnp.inf)
        m_new, alpha, p = online_softmax_step(m, s, jnp.exp2)
        l = running_sum(l * alpha, p)
        acc = accumulate(acc * alpha[:, None], p, v, prec)
        acct = acct * alpha[:, None]
        if has_ts:
            sd = None
            if has_tq:
                sd = dot(tq, k, prec, trans_b=True)
            if has_tk:
                tk = tk_ref[pl.ds(start, bk), :]
                sdk = dot(q, tk, prec, trans_b=True)
                sd = sdk if sd is None else sd + sdk
            pd = p * (sd * scale)
            r = running_sum(r * alpha, pd)
            acct = accumulate(acct, pd, v, prec)
        if has_tv:
            acct = accumulate(acct, p, tv_ref[pl.ds(start, bk), :], prec)
        return acc, acct, m_new, l, r

    init = (
        jnp.zeros((bq, d), jnp.float32),
        jnp.zeros((bq, d), jnp.float32),
        jnp.full((bq,), -1e30, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, acct, m, l, r = _run_schedule(row, fi_ref, fc_ref, pi_ref, pc_ref, body, init)
    empty = l == 0.0
    inv_l = 1.0 / jnp.where(empty, 1.0, l)
    o = acc * inv_l[:, None]
    to = acct * inv_l[:, None] - (r * inv_l)[:, None] * o
    o_ref[...] = o.astype(o_ref.dtype)
    to_ref[...] = to.astype(to_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, l))) * LN2)


# ----------------------------------------------------------------------------- backward
def _dkdv_kernel(
    fi_ref,
    fc_ref,
    pi_ref,
    pc_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    spec,
    scale,
    bq,
    bk,
    rows,
    reverse,
    poison,
):
    if poison:
        refs = refs[2:]
    dk_ref, dv_ref = refs
    row = _row_map(reverse, rows)(pl.program_id(0))  # key tile
    prec = precision(q_ref.dtype)
    k = k_ref[...]
    v = v_ref[...]
    d = k.shape[-1]
    c = scale * LOG2E
    k0 = row * bk

    def body(col, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(col * bq, bq)
        q = q_ref[pl.ds(start, bq), :]
        do = do_ref[pl.ds(start, bq), :]
        lse2 = lse_ref[pl.ds(start, bq)]
        delta = delta_ref[pl.ds(start, bq)]
        s = dot(q, k, prec, trans_b=True) * c
        p = softmax_probs(s, lse2, jnp.exp2)
        if masked:
            p = jnp.where(tile_mask(spec, start, bq, k0, bk), p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, prec, trans_a=True)
        dp = dot(do, v, prec, trans_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + dot(ds.astype(q.dtype), q, prec, trans_a=True)
        return dk, dv

    init = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    dk, dv = _run_schedule(row, fi_ref, fc_ref, pi_ref, pc_ref, body, init)
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    fi_ref,
    fc_ref,
    pi_ref,
    pc_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    *refs,
    spec,
    scale,
    bq,
    bk,
    rows,
    reverse,
    poison,
):
    if poison:
        refs = refs[1:]
    (dq_ref,) = refs
    row = _row_map(reverse, rows)(pl.program_id(0))
    prec = precision(q_ref.dtype)
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = delta_ref[...]
    d = q.shape[-1]
    c = scale * LOG2E

    def body(col, dq, masked):
        start = pl.multiple_of(col * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot(q, k, prec, trans_b=True) * c
        p = softmax_probs(s, lse2, jnp.exp2)
        if masked:
            p = jnp.where(tile_mask(spec, row * bq, bq, start, bk), p, 0.0)
        dp = dot(do, v, prec, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, prec)

    dq = _run_schedule(row, fi_ref, fc_ref, pi_ref, pc_ref, body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _pad_len(x, length):
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))


def _qspec(bq, rmap, d):
    return pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, rmap(i), h, 0))


def _full_seq_spec(length, d):
    return pl.BlockSpec((None, length, None, d), lambda i, b, h: (b, 0, h, 0))


def _row_vec_spec(bq, rmap):
    return pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, rmap(i)))


def _full_vec_spec(length):
    return pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))


def _poisoned(shapes):
    return [jnp.full(s.shape, jnp.nan, s.dtype) for s in shapes]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret", "poison", "reverse"))
def flash_forward(
    q,
    k,
    v,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
    reverse: bool = True,
):
    """Forward pass.

    Args: q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` (bf16 or fp32, D in {64, 128}).
    Returns: o `[B, Lq, H, D]` (q.dtype), lse `[B, H, Lq]` float32 (-inf for rows
    with no allowed key). `poison=True` pre-fills the outputs with NaN (aliased
    buffers) so that unwritten elements show up (tests only).
    """
    check_inputs(q, k, v, spec)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    config = default_config(q.dtype) if config is None else config
    t = config.fwd
    mult = config.pad_multiple
    Lqp, Lkp = padded(Lq, mult), padded(Lk, mult)
    rows = Lqp // t.block_q
    rmap = _row_map(reverse, rows)
    sched = _schedule(spec, t.block_q, t.block_k, False, rows, config.full_ranges)
    qp, kp, vp = _pad_len(q, Lqp), _pad_len(k, Lkp), _pad_len(v, Lkp)
    out_shape = [jax.ShapeDtypeStruct((B, Lqp, H, D), q.dtype), jax.ShapeDtypeStruct((B, H, Lqp), jnp.float32)]
    out_specs = [_qspec(t.block_q, rmap, D), _row_vec_spec(t.block_q, rmap)]
    in_specs = [_whole(a.shape) for a in sched] + [
        _qspec(t.block_q, rmap, D),
        _full_seq_spec(Lkp, D),
        _full_seq_spec(Lkp, D),
    ]
    args = list(sched) + [qp, kp, vp]
    aliases = {}
    if poison:
        aliases = {len(args): 0, len(args) + 1: 1}
        args += _poisoned(out_shape)
        in_specs += out_specs
    kernel = functools.partial(
        _fwd_kernel, spec=spec, scale=scale, bq=t.block_q, bk=t.block_k, rows=rows, reverse=reverse, poison=poison
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(rows, B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(t),
        interpret=interpret,
        name="crm_flash_fwd",
    )(*args)
    return o[:, :Lq], lse[:, :, :Lq]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret", "poison", "reverse"))
def flash_jvp(
    q,
    k,
    v,
    tq,
    tk,
    tv,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
    reverse: bool = True,
):
    """Forward-mode pass: primal output and its tangent in one streaming pass.

    Args: q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]`; tangents tq/tk/tv of the same
    shapes and dtype, or None for a zero tangent (its loads and dots are skipped).
    Returns: o `[B, Lq, H, D]`, to (tangent of o) `[B, Lq, H, D]`, lse `[B, H, Lq]`.
    """
    check_inputs(q, k, v, spec)
    for name, x, ref in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if x is not None and (x.shape != ref.shape or x.dtype != ref.dtype):
            raise ValueError(f"tangent {name} {x.shape}/{x.dtype} does not match its primal {ref.shape}/{ref.dtype}")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    config = default_config(q.dtype) if config is None else config
    t = config.jvp
    mult = config.pad_multiple
    Lqp, Lkp = padded(Lq, mult), padded(Lk, mult)
    rows = Lqp // t.block_q
    rmap = _row_map(reverse, rows)
    sched = _schedule(spec, t.block_q, t.block_k, False, rows, config.full_ranges)
    has = (tq is not None, tk is not None, tv is not None)
    in_specs = [_whole(a.shape) for a in sched] + [
        _qspec(t.block_q, rmap, D),
        _full_seq_spec(Lkp, D),
        _full_seq_spec(Lkp, D),
    ]
    args = list(sched) + [_pad_len(q, Lqp), _pad_len(k, Lkp), _pad_len(v, Lkp)]
    if has[0]:
        in_specs.append(_qspec(t.block_q, rmap, D))
        args.append(_pad_len(tq, Lqp))
    if has[1]:
        in_specs.append(_full_seq_spec(Lkp, D))
        args.append(_pad_len(tk, Lkp))
    if has[2]:
        in_specs.append(_full_seq_spec(Lkp, D))
        args.append(_pad_len(tv, Lkp))
    out_shape = [
        jax.ShapeDtypeStruct((B, Lqp, H, D), q.dtype),
        jax.ShapeDtypeStruct((B, Lqp, H, D), q.dtype),
        jax.ShapeDtypeStruct((B, H, Lqp), jnp.float32),
    ]
    out_specs = [_qspec(t.block_q, rmap, D), _qspec(t.block_q, rmap, D), _row_vec_spec(t.block_q, rmap)]
    aliases = {}
    if poison:
        aliases = {len(args) + j: j for j in range(3)}
        args += _poisoned(out_shape)
        in_specs += out_specs
    kernel = functools.partial(
        _jvp_kernel,
        spec=spec,
        scale=scale,
        bq=t.block_q,
        bk=t.block_k,
        rows=rows,
        reverse=reverse,
        has_tq=has[0],
        has_tk=has[1],
        has_tv=has[2],
        poison=poison,
    )
    o, to, lse = pl.pallas_call(
        kernel,
        grid=(rows, B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(t),
        interpret=interpret,
        name="crm_flash_jvp",
    )(*args)
    return o[:, :Lq], to[:, :Lq], lse[:, :, :Lq]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret", "poison", "reverse"))
def flash_backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool = False,
    poison: bool = False,
    reverse: bool = True,
):
    """Backward pass from the forward's residuals.

    Args: q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]`, o and do `[B, Lq, H, D]`,
    lse `[B, H, Lq]` float32 (as returned by `flash_forward`).
    Returns: dq `[B, Lq, H, D]`, dk, dv `[B, Lk, H, D]` in the input dtypes.
    The row statistic delta = rowsum(dO * O) is computed here in XLA (fp32).
    """
    check_inputs(q, k, v, spec)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D**-0.5 if scale is None else float(scale)
    config = default_config(q.dtype) if config is None else config
    mult = config.pad_multiple
    Lqp, Lkp = padded(Lq, mult), padded(Lk, mult)
    do = do.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    # log2-domain lse; rows with no allowed key get +inf so that every p is 0.
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, jnp.inf).astype(jnp.float32)
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, Lqp - Lq)), constant_values=jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, Lqp - Lq)))
    qp, kp, vp, dop = _pad_len(q, Lqp), _pad_len(k, Lkp), _pad_len(v, Lkp), _pad_len(do, Lqp)

    # dK, dV: grid over key tiles, loop over query tiles (transposed schedule).
    t = config.dkdv
    rows = Lkp // t.block_k
    rmap = _row_map(reverse, rows)
    sched = _schedule(spec, t.block_q, t.block_k, True, rows, config.full_ranges)
    kspec = pl.BlockSpec((None, t.block_k, None, D), lambda i, b, h: (b, rmap(i), h, 0))
    in_specs = [_whole(a.shape) for a in sched] + [
        _full_seq_spec(Lqp, D),
        kspec,
        kspec,
        _full_seq_spec(Lqp, D),
        _full_vec_spec(Lqp),
        _full_vec_spec(Lqp),
    ]
    args = list(sched) + [qp, kp, vp, dop, lse2, delta]
    out_shape = [jax.ShapeDtypeStruct((B, Lkp, H, D), k.dtype), jax.ShapeDtypeStruct((B, Lkp, H, D), v.dtype)]
    out_specs = [kspec, kspec]
    aliases = {}
    if poison:
        aliases = {len(args): 0, len(args) + 1: 1}
        args += _poisoned(out_shape)
        in_specs += out_specs
    kernel = functools.partial(
        _dkdv_kernel, spec=spec, scale=scale, bq=t.block_q, bk=t.block_k, rows=rows, reverse=reverse, poison=poison
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid=(rows, B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(t),
        interpret=interpret,
        name="crm_flash_dkdv",
    )(*args)

    # dQ: grid over query tiles, loop over key tiles.
    t = config.dq
    rows = Lqp // t.block_q
    rmap = _row_map(reverse, rows)
    sched = _schedule(spec, t.block_q, t.block_k, False, rows, config.full_ranges)
    in_specs = [_whole(a.shape) for a in sched] + [
        _qspec(t.block_q, rmap, D),
        _full_seq_spec(Lkp, D),
        _full_seq_spec(Lkp, D),
        _qspec(t.block_q, rmap, D),
        _row_vec_spec(t.block_q, rmap),
        _row_vec_spec(t.block_q, rmap),
    ]
    args = list(sched) + [qp, kp, vp, dop, lse2, delta]
    out_shape = [jax.ShapeDtypeStruct((B, Lqp, H, D), q.dtype)]
    out_specs = [_qspec(t.block_q, rmap, D)]
    aliases = {}
    if poison:
        aliases = {len(args): 0}
        args += _poisoned(out_shape)
        in_specs += out_specs
    kernel = functools.partial(
        _dq_kernel, spec=spec, scale=scale, bq=t.block_q, bk=t.block_k, rows=rows, reverse=reverse, poison=poison
    )
    (dq,) = pl.pallas_call(
        kernel,
        grid=(rows, B, H),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compiler_params(t),
        interpret=interpret,
        name="crm_flash_dq",
    )(*args)
    return dq[:, :Lq], dk[:, :Lk], dv[:, :Lk]
