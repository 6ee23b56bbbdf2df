"""Block-sparse flash attention for TPU (Pallas Mosaic): forward (+LSE), backward, JVP.

Same math and schedules as `pallas_kernels.triton.flash`, written in the TPU style:
the key (or, for dK/dV, query) tile loop is the last, "arbitrary" grid axis; the
visited tiles come from a schedule passed by scalar prefetch (SMEM), which
drives the BlockSpec index maps, so Mosaic's pipeline DMAs only the tiles the mask
needs; accumulators live in VMEM scratch and are finalised at the last step.

Schedule: `masks.tile_runs`, per row tile the runs of consecutive column tiles of one
class (full: no element-wise mask; partial: masked), flattened to `[rows * runs]` int32
(`start` = 2 * first tile + masked, `end` = cumulative steps). Its size grows with the
rows only, so it fits the 1 MiB of scalar memory at any sequence length the configs use
(a per-step tile list is rows x steps: 1.15 MiB at 65,520 tokens and 128-token tiles).
Each grid step finds its run by an unrolled scan over the row's few runs; steps past a
row's last tile repeat that tile (no new DMA) and compute nothing.

Layout: public q `[B, Lq, H, D]`; the wrappers transpose to `[B, H, L, D]` (TPU
blocks want the last two dims (tokens, head_dim)) and pad L to a tile multiple.
lse is `[B, H, Lq]` (kept as `[B, H, Lq, 1]` inside).

Numerics are tested in Pallas TPU interpret mode on CPU (`interpret=pltpu.InterpretParams()`);
every kernel compiles for v4, v5e, v5p and v6e chips (tests/test_tpu_compile.py, ahead of time
from a CPU host); not yet timed on a TPU. Each `pallas_call` declares its cost
(`pl.CostEstimate`) from the tiles it visits, so XLA's scheduler and `cost_analysis()` see the
block sparsity.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (
    SUPPORTED_HEAD_DIMS,
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
from pallas_kernels.masks import MaskSpec, tile_runs

DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile sizes (block_q, block_k) of each kernel; powers of two, >= 8.

    Queries are padded to a multiple of the largest block_q, keys to the largest block_k.
    """

    fwd: tuple[int, int] = (DEFAULT_BLOCK, DEFAULT_BLOCK)
    jvp: tuple[int, int] = (DEFAULT_BLOCK, DEFAULT_BLOCK)
    dkdv: tuple[int, int] = (DEFAULT_BLOCK, DEFAULT_BLOCK)
    dq: tuple[int, int] = (DEFAULT_BLOCK, DEFAULT_BLOCK)

    def __post_init__(self):
        for name in ("fwd", "jvp", "dkdv", "dq"):
            tiles = tuple(getattr(self, name))
            if len(tiles) != 2 or any(b < 8 or b & (b - 1) for b in tiles):
                raise ValueError(f"MosaicConfig.{name} must be two powers of two >= 8, got {tiles}")
            object.__setattr__(self, name, tuple(int(b) for b in tiles))

    @property
    def q_multiple(self) -> int:
        return max(t[0] for t in (self.fwd, self.jvp, self.dkdv, self.dq))

    @property
    def kv_multiple(self) -> int:
        return max(t[1] for t in (self.fwd, self.jvp, self.dkdv, self.dq))

    @staticmethod
    def uniform(block_q: int, block_k: int | None = None) -> MosaicConfig:
        t = (block_q, block_q if block_k is None else block_k)
        return MosaicConfig(t, t, t, t)


def _fit(length: int, block: int) -> int:
    """`block`, or the smallest power of two >= 128 that holds `length` if that is smaller."""
    return min(block, max(128, 1 << (int(length) - 1).bit_length()))


def default_config(q_len: int, kv_len: int) -> MosaicConfig:
    """Tiles for these lengths: 512 x 512 on every kernel, or less for a shorter sequence.

    512-token tiles amortise the fixed cost of a grid step (its DMA setup and the scalar
    work of the schedule) over 2 x 512 x 512 x 128 x 2 = 134 MFLOP of MXU work per head and
    step, and keep the JVP kernel (the largest: three 512 x 512 float32 score tiles, two
    512 x 128 accumulators, double-buffered inputs) inside the default 16 MiB of scoped VMEM
    on v4, v5e, v5p and v6e; 1024 overflows it on v4, v5e and v5p (docs/tpu.md).
    """
    t = (_fit(q_len, DEFAULT_BLOCK), _fit(kv_len, DEFAULT_BLOCK))
    return MosaicConfig(t, t, t, t)


@functools.lru_cache(maxsize=256)
def _runs(spec: MaskSpec, bq: int, bk: int, transpose: bool, rows: int):
    """(start, end, runs, steps, visited) of `masks.tile_runs` for the scalar prefetch: `start`
    `[rows * runs]` holds 2 * first column tile + masked, `end` `[rows * runs]` the
    cumulative step counts; `visited` counts the tiles the kernel computes."""
    r = tile_runs(spec, bq, bk, transpose=transpose, rows=rows)
    return *r.packed(), r.steps, r.visited_pairs


def _cost(visited: int, B: int, H: int, bq: int, bk: int, D: int, dots: int, row_bytes: int, col_bytes: int):
    """`pl.CostEstimate` of a kernel that visits `visited` (row, column) tiles per (batch, head):
    `dots` bq x bk x D matmuls and bq x bk exponentials per tile, `row_bytes` read/written once per
    row tile and `col_bytes` read per visited tile. Lets XLA's scheduler and `cost_analysis()`
    see the block sparsity."""
    per = B * H * visited
    return pl.CostEstimate(
        flops=int(per * dots * 2 * bq * bk * D),
        transcendentals=int(per * bq * bk),
        bytes_accessed=int(B * H * row_bytes + per * col_bytes),
    )


def _locate(i, j, start_ref, end_ref, runs):
    """Step `j` of row `i` -> (column tile, masked, real): the run holding step j, unrolled
    over the row's `runs` entries. Steps past the row's total repeat its last tile (no new
    DMA) and are not real."""
    base = i * runs
    total = end_ref[base + runs - 1]
    jj = jnp.minimum(j, jnp.maximum(total - 1, 0))
    col = jnp.int32(0)
    masked = jnp.int32(0)
    prev = jnp.int32(0)
    for r in range(runs):
        end = end_ref[base + r]
        packed = start_ref[base + r]
        hit = jnp.logical_and(jj >= prev, jj < end)
        col = jnp.where(hit, lax.shift_right_logical(packed, 1) + jj - prev, col)
        masked = jnp.where(hit, jnp.bitwise_and(packed, 1), masked)
        prev = end
    return col, masked, j < total


def _to_bhld(x, length):
    x = jnp.swapaxes(x, 1, 2)
    pad = length - x.shape[2]
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


def _from_bhld(x, length):
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _row_spec(b, d):
    return pl.BlockSpec((None, None, b, d), lambda bi, h, i, j, *_: (bi, h, i, 0))


def _col_spec(b, d, runs):
    def index(bi, h, i, j, start_ref, end_ref):
        return bi, h, _locate(i, j, start_ref, end_ref, runs)[0], 0

    return pl.BlockSpec((None, None, b, d), index)


# ----------------------------------------------------------------------------- kernels
def _online_step(spec, scale, q, k, row0, col0, bq, bk, masked, m_ref, l_ref, prec):
    """Scores of the tile (q `[bq, D]`, k `[bk, D]`), masked when `masked`, and the online-softmax
    update of the running max and sum in m_ref, l_ref `[bq, 1]` -> p `[bq, bk]`, alpha `[bq, 1]`."""
    s = dot(q, k, prec, trans_b=True) * scale
    if masked:
        s = jnp.where(tile_mask(spec, row0, bq, col0, bk), s, -jnp.inf)
    m_new, alpha, p = online_softmax_step(m_ref[...], s, jnp.exp)
    l_ref[...] = running_sum(alpha * l_ref[...], p)
    m_ref[...] = m_new
    return p, alpha


def _fwd_kernel(
    start_ref, end_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref, *, spec, scale, bq, bk, steps, runs
):
    i, j = pl.program_id(2), pl.program_id(3)
    prec = precision(q_ref.dtype)
    col, masked, real = _locate(i, j, start_ref, end_ref, runs)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -1e30)
        l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked):
        col0 = col * bk
        v = v_ref[...]
        p, alpha = _online_step(spec, scale, q_ref[...], k_ref[...], i * bq, col0, bq, bk, masked, m_ref, l_ref, prec)
        acc_ref[...] = accumulate(alpha * acc_ref[...], p, v, prec)

    pl.when(jnp.logical_and(real, masked == 0))(lambda: step(False))
    pl.when(jnp.logical_and(real, masked == 1))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        l = l_ref[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))


def _jvp_kernel(start_ref, end_ref, *refs, spec, scale, bq, bk, steps, runs, has_tq, has_tk, has_tv):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    tq_ref = refs.pop(0) if has_tq else None
    tk_ref = refs.pop(0) if has_tk else None
    tv_ref = refs.pop(0) if has_tv else None
    o_ref, to_ref, lse_ref, acc_ref, acct_ref, m_ref, l_ref, r_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)
    prec = precision(q_ref.dtype)
    col, masked, real = _locate(i, j, start_ref, end_ref, runs)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        acct_ref[...] = jnp.zeros_like(acct_ref)
        m_ref[...] = jnp.full_like(m_ref, -1e30)
        l_ref[...] = jnp.zeros_like(l_ref)
        r_ref[...] = jnp.zeros_like(r_ref)

    def step(masked):
        col0 = col * bk
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        p, alpha = _online_step(spec, scale, q, k, i * bq, col0, bq, bk, masked, m_ref, l_ref, prec)
        acc_ref[...] = accumulate(alpha * acc_ref[...], p, v, prec)
        acct = alpha * acct_ref[...]
        if has_tq or has_tk:
            sd = 0.0
            if has_tq:
                sd = sd + dot(tq_ref[...], k, prec, trans_b=True)
            if has_tk:
                sd = sd + dot(q, tk_ref[...], prec, trans_b=True)
            pd = p * (sd * scale)
            r_ref[...] = running_sum(alpha * r_ref[...], pd)
            acct = accumulate(acct, pd, v, prec)
        else:
            r_ref[...] = alpha * r_ref[...]
        if has_tv:
            acct = accumulate(acct, p, tv_ref[...], prec)
        acct_ref[...] = acct

    pl.when(jnp.logical_and(real, masked == 0))(lambda: step(False))
    pl.when(jnp.logical_and(real, masked == 1))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        l = l_ref[...]
        empty = l == 0.0
        inv_l = 1.0 / jnp.where(empty, 1.0, l)
        o = acc_ref[...] * inv_l
        o_ref[...] = o.astype(o_ref.dtype)
        to_ref[...] = (acct_ref[...] * inv_l - (r_ref[...] * inv_l) * o).astype(to_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _dkdv_kernel(
    start_ref,
    end_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dk_ref,
    dv_ref,
    dk_acc,
    dv_acc,
    *,
    spec,
    scale,
    bq,
    bk,
    steps,
    runs,
):
    i, j = pl.program_id(2), pl.program_id(3)  # i: key tile
    prec = precision(q_ref.dtype)
    col, masked, real = _locate(i, j, start_ref, end_ref, runs)

    @pl.when(j == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked):
        row0 = col * bq
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = dot(q, k, prec, trans_b=True) * scale
        p = softmax_probs(s, lse_ref[...], jnp.exp)
        if masked:
            p = jnp.where(tile_mask(spec, row0, bq, i * bk, bk), p, 0.0)
        dv_acc[...] += dot(p.astype(do.dtype), do, prec, trans_a=True)
        dp = dot(do, v, prec, trans_b=True)
        ds = p * (dp - delta_ref[...])
        dk_acc[...] += dot(ds.astype(q.dtype), q, prec, trans_a=True)

    pl.when(jnp.logical_and(real, masked == 0))(lambda: step(False))
    pl.when(jnp.logical_and(real, masked == 1))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(
    start_ref,
    end_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    dq_acc,
    *,
    spec,
    scale,
    bq,
    bk,
    steps,
    runs,
):
    i, j = pl.program_id(2), pl.program_id(3)
    prec = precision(q_ref.dtype)
    col, masked, real = _locate(i, j, start_ref, end_ref, runs)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros_like(dq_acc)

    def step(masked):
        col0 = col * bk
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = dot(q, k, prec, trans_b=True) * scale
        p = softmax_probs(s, lse_ref[...], jnp.exp)
        if masked:
            p = jnp.where(tile_mask(spec, i * bq, bq, col0, bk), p, 0.0)
        dp = dot(do, v, prec, trans_b=True)
        ds = p * (dp - delta_ref[...])
        dq_acc[...] += dot(ds.astype(k.dtype), k, prec)

    pl.when(jnp.logical_and(real, masked == 0))(lambda: step(False))
    pl.when(jnp.logical_and(real, masked == 1))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        dq_ref[...] = (dq_acc[...] * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- wrappers
def _interp(interpret):
    """True / "tpu": Pallas TPU interpret mode (simulated TPU memories, CPU);
    "generic": Pallas' generic (discharge) interpreter, faster on CPU; False: compile."""
    if interpret is True or interpret == "tpu":
        return pltpu.InterpretParams()
    if interpret == "generic":
        return True
    return interpret


def _prologue(q, k, v, spec, scale, config):
    check_inputs(q, k, v, spec)
    B, Lq, H, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    Lk = k.shape[1]
    config = default_config(Lq, Lk) if config is None else config
    return B, Lq, Lk, H, D, scale, config, padded(Lq, config.q_multiple), padded(Lk, config.kv_multiple)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_forward(q, k, v, spec: MaskSpec, *, scale=None, config: MosaicConfig | None = None, interpret=False):
    """q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` -> o `[B, Lq, H, D]`, lse `[B, H, Lq]` f32."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    isz = jnp.dtype(q.dtype).itemsize
    bq, bk = config.fwd
    rows = Lqp // bq
    start, end, runs, steps, visited = _runs(spec, bq, bk, False, rows)
    kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps, runs=runs)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, rows, steps),
            in_specs=[_row_spec(bq, D), _col_spec(bk, D, runs), _col_spec(bk, D, runs)],
            out_specs=[_row_spec(bq, D), _row_spec(bq, 1)],
            scratch_shapes=[
                pltpu.VMEM((bq, D), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype), jax.ShapeDtypeStruct((B, H, Lqp, 1), jnp.float32)],
        compiler_params=_params(),
        interpret=_interp(interpret),
        name="crm_mosaic_fwd",
        cost_estimate=_cost(visited, B, H, bq, bk, D, 2, Lqp * (2 * D * isz + 4), 2 * bk * D * isz),
    )(jnp.asarray(start), jnp.asarray(end), _to_bhld(q, Lqp), _to_bhld(k, Lkp), _to_bhld(v, Lkp))
    return _from_bhld(o, Lq), lse[:, :, :Lq, 0]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_jvp(q, k, v, tq, tk, tv, spec: MaskSpec, *, scale=None, config: MosaicConfig | None = None, interpret=False):
    """(q, k, v) and tangents (or None for zero) -> o, to `[B, Lq, H, D]`, lse `[B, H, Lq]`."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    isz = jnp.dtype(q.dtype).itemsize
    bq, bk = config.jvp
    rows = Lqp // bq
    start, end, runs, steps, visited = _runs(spec, bq, bk, False, rows)
    has = (tq is not None, tk is not None, tv is not None)
    in_specs = [_row_spec(bq, D), _col_spec(bk, D, runs), _col_spec(bk, D, runs)]
    args = [_to_bhld(q, Lqp), _to_bhld(k, Lkp), _to_bhld(v, Lkp)]
    for h_, t_, spec_, L_ in (
        (has[0], tq, _row_spec(bq, D), Lqp),
        (has[1], tk, _col_spec(bk, D, runs), Lkp),
        (has[2], tv, _col_spec(bk, D, runs), Lkp),
    ):
        if h_:
            in_specs.append(spec_)
            args.append(_to_bhld(t_.astype(q.dtype), L_))
    kernel = functools.partial(
        _jvp_kernel,
        spec=spec,
        scale=scale,
        bq=bq,
        bk=bk,
        steps=steps,
        runs=runs,
        has_tq=has[0],
        has_tk=has[1],
        has_tv=has[2],
    )
    o, to, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, rows, steps),
            in_specs=in_specs,
            out_specs=[_row_spec(bq, D), _row_spec(bq, D), _row_spec(bq, 1)],
            scratch_shapes=[
                pltpu.VMEM((bq, D), jnp.float32),
                pltpu.VMEM((bq, D), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype),
            jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype),
            jax.ShapeDtypeStruct((B, H, Lqp, 1), jnp.float32),
        ],
        compiler_params=_params(),
        interpret=_interp(interpret),
        name="crm_mosaic_jvp",
        cost_estimate=_cost(
            visited,
            B,
            H,
            bq,
            bk,
            D,
            2 + has[0] + has[1] + (has[0] or has[1]) + has[2],
            Lqp * ((3 + has[0]) * D * isz + 4),
            (2 + has[1] + has[2]) * bk * D * isz,
        ),
    )(jnp.asarray(start), jnp.asarray(end), *args)
    return _from_bhld(o, Lq), _from_bhld(to, Lq), lse[:, :, :Lq, 0]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_backward(
    q, k, v, o, lse, do, spec: MaskSpec, *, scale=None, config: MosaicConfig | None = None, interpret=False
):
    """Residuals (q, k, v, o, lse) and do -> dq `[B, Lq, H, D]`, dk, dv `[B, Lk, H, D]`."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    isz = jnp.dtype(q.dtype).itemsize
    do = do.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    lse_s = jnp.where(jnp.isfinite(lse), lse, jnp.inf).astype(jnp.float32)
    lse_s = jnp.pad(lse_s, ((0, 0), (0, 0), (0, Lqp - Lq)), constant_values=jnp.inf)[..., None]
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, Lqp - Lq)))[..., None]
    qt, dot_ = _to_bhld(q, Lqp), _to_bhld(do, Lqp)
    kt, vt = _to_bhld(k, Lkp), _to_bhld(v, Lkp)

    bq, bk = config.dkdv
    rows = Lkp // bk
    start, end, runs, steps, visited = _runs(spec, bq, bk, True, rows)
    kernel = functools.partial(_dkdv_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps, runs=runs)
    qcol = _col_spec(bq, D, runs)
    vcol = _col_spec(bq, 1, runs)
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, rows, steps),
            in_specs=[qcol, _row_spec(bk, D), _row_spec(bk, D), qcol, vcol, vcol],
            out_specs=[_row_spec(bk, D), _row_spec(bk, D)],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lkp, D), k.dtype), jax.ShapeDtypeStruct((B, H, Lkp, D), v.dtype)],
        compiler_params=_params(),
        interpret=_interp(interpret),
        name="crm_mosaic_dkdv",
        cost_estimate=_cost(visited, B, H, bq, bk, D, 4, Lkp * 4 * D * isz, bq * (2 * D * isz + 8)),
    )(jnp.asarray(start), jnp.asarray(end), qt, kt, vt, dot_, lse_s, delta)

    bq, bk = config.dq
    rows = Lqp // bq
    start, end, runs, steps, visited = _runs(spec, bq, bk, False, rows)
    kernel = functools.partial(_dq_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps, runs=runs)
    kcol = _col_spec(bk, D, runs)
    (dq,) = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, H, rows, steps),
            in_specs=[_row_spec(bq, D), kcol, kcol, _row_spec(bq, D), _row_spec(bq, 1), _row_spec(bq, 1)],
            out_specs=[_row_spec(bq, D)],
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype)],
        compiler_params=_params(),
        interpret=_interp(interpret),
        name="crm_mosaic_dq",
        cost_estimate=_cost(visited, B, H, bq, bk, D, 3, Lqp * (3 * D * isz + 8), 2 * bk * D * isz),
    )(jnp.asarray(start), jnp.asarray(end), qt, kt, vt, dot_, lse_s, delta)
    return _from_bhld(dq, Lq), _from_bhld(dk, Lk), _from_bhld(dv, Lk)


__all__ = ["MosaicConfig", "mosaic_forward", "mosaic_backward", "mosaic_jvp", "SUPPORTED_HEAD_DIMS"]
