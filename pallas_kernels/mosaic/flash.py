"""Block-sparse flash attention for TPU (Pallas Mosaic): forward (+LSE), backward, JVP.

Same math and schedules as `pallas_kernels.triton.flash`, written in the TPU style:
the key (or, for dK/dV, query) tile loop is the last, "arbitrary" grid axis; the
visited tiles come from a merged schedule passed by scalar prefetch (SMEM) and
drive the BlockSpec index maps, so Mosaic's pipeline DMAs only the tiles the mask
needs; accumulators live in VMEM scratch and are finalised at the last step.

Schedule per row tile (flattened `[rows * S]` int32, S = most tiles in any row):
  idx  : column tile to visit at step j (padding repeats the row's last tile, so
         no new DMA is issued),
  kind : 1 full tile (no element-wise mask), 2 partial tile (masked), 0 padding.

Layout: public q `[B, Lq, H, D]`; the wrappers transpose to `[B, H, L, D]` (TPU
blocks want the last two dims (tokens, head_dim)) and pad L to a tile multiple.
lse is `[B, H, Lq]` (kept as `[B, H, Lq, 1]` inside).

Status: tested only in Pallas TPU interpret mode on CPU
(`interpret=pltpu.InterpretParams()`); never compiled for or run on a TPU here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.masks import MaskSpec
from pallas_kernels.triton.flash import (SUPPORTED_HEAD_DIMS, _check, _padded, _schedule_np,
                                         kernel_allowed)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Tile sizes (block_q, block_k) of each kernel; powers of two, >= 8."""

    fwd: tuple[int, int] = (128, 128)
    jvp: tuple[int, int] = (128, 128)
    dkdv: tuple[int, int] = (128, 128)
    dq: tuple[int, int] = (128, 128)

    @property
    def pad_multiple(self) -> int:
        return max(max(t) for t in (self.fwd, self.jvp, self.dkdv, self.dq))

    @staticmethod
    def uniform(block: int) -> "MosaicConfig":
        return MosaicConfig((block, block), (block, block), (block, block), (block, block))


@functools.lru_cache(maxsize=256)
def _merged_schedule(spec: MaskSpec, bq: int, bk: int, transpose: bool, rows: int):
    """(idx [rows*S], kind [rows*S], S) from `tile_schedule`: full tiles then partial ones."""
    fi, fc, pi, pc = _schedule_np(spec, bq, bk, transpose, rows)
    steps = max(1, int((fc + pc).max(initial=0)))
    idx = np.zeros((rows, steps), np.int32)
    kind = np.zeros((rows, steps), np.int32)
    for r in range(rows):
        cols = list(fi[r, :fc[r]]) + list(pi[r, :pc[r]])
        kinds = [1] * int(fc[r]) + [2] * int(pc[r])
        if cols:
            idx[r, :len(cols)] = cols
            idx[r, len(cols):] = cols[-1]
            kind[r, :len(cols)] = kinds
    return idx.reshape(-1), kind.reshape(-1), steps


def _tile_mask(spec, row0, bq, col0, bk):
    qp = row0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    kp = col0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return kernel_allowed(spec, qp, kp)


def _dot(a, b, prec, ta=False, tb=False):
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _prec(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _to_bhld(x, length):
    x = jnp.swapaxes(x, 1, 2)
    pad = length - x.shape[2]
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x


def _from_bhld(x, length):
    return jnp.swapaxes(x[:, :, :length], 1, 2)


def _params():
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _row_spec(b, d):
    return pl.BlockSpec((None, None, b, d), lambda bi, h, i, j, *_: (bi, h, i, 0))


def _col_spec(b, d, steps):
    return pl.BlockSpec((None, None, b, d),
                        lambda bi, h, i, j, idx, kind: (bi, h, idx[i * steps + j], 0))


# ----------------------------------------------------------------------------- kernels
def _online_step(spec, scale, q, k, v, row0, col0, bq, bk, masked, m_ref, l_ref, prec):
    s = _dot(q, k, prec, tb=True) * scale
    if masked:
        s = jnp.where(_tile_mask(spec, row0, bq, col0, bk), s, -jnp.inf)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    return p, alpha


def _fwd_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, acc_ref, m_ref, l_ref,
                *, spec, scale, bq, bk, steps):
    i, j = pl.program_id(2), pl.program_id(3)
    prec = _prec(q_ref.dtype)
    kind = kind_ref[i * steps + j]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, -1e30)
        l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked):
        col0 = idx_ref[i * steps + j] * bk
        v = v_ref[...]
        p, alpha = _online_step(spec, scale, q_ref[...], k_ref[...], v, i * bq, col0, bq, bk,
                                masked, m_ref, l_ref, prec)
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, prec)

    pl.when(kind == 1)(lambda: step(False))
    pl.when(kind == 2)(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        l = l_ref[...]
        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_ref[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(l_safe))


def _jvp_kernel(idx_ref, kind_ref, *refs, spec, scale, bq, bk, steps, has_tq, has_tk, has_tv):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs[:3]
    refs = refs[3:]
    tq_ref = refs.pop(0) if has_tq else None
    tk_ref = refs.pop(0) if has_tk else None
    tv_ref = refs.pop(0) if has_tv else None
    o_ref, to_ref, lse_ref, acc_ref, acct_ref, m_ref, l_ref, r_ref = refs
    i, j = pl.program_id(2), pl.program_id(3)
    prec = _prec(q_ref.dtype)
    kind = kind_ref[i * steps + j]

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        acct_ref[...] = jnp.zeros_like(acct_ref)
        m_ref[...] = jnp.full_like(m_ref, -1e30)
        l_ref[...] = jnp.zeros_like(l_ref)
        r_ref[...] = jnp.zeros_like(r_ref)

    def step(masked):
        col0 = idx_ref[i * steps + j] * bk
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        p, alpha = _online_step(spec, scale, q, k, v, i * bq, col0, bq, bk, masked, m_ref, l_ref,
                                prec)
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, prec)
        acct = alpha * acct_ref[...]
        if has_tq or has_tk:
            sd = 0.0
            if has_tq:
                sd = sd + _dot(tq_ref[...], k, prec, tb=True)
            if has_tk:
                sd = sd + _dot(q, tk_ref[...], prec, tb=True)
            pd = p * (sd * scale)
            r_ref[...] = alpha * r_ref[...] + jnp.sum(pd, axis=1, keepdims=True)
            acct = acct + _dot(pd.astype(v.dtype), v, prec)
        else:
            r_ref[...] = alpha * r_ref[...]
        if has_tv:
            tv = tv_ref[...]
            acct = acct + _dot(p.astype(tv.dtype), tv, prec)
        acct_ref[...] = acct

    pl.when(kind == 1)(lambda: step(False))
    pl.when(kind == 2)(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        l = l_ref[...]
        empty = l == 0.0
        inv_l = 1.0 / jnp.where(empty, 1.0, l)
        o = acc_ref[...] * inv_l
        o_ref[...] = o.astype(o_ref.dtype)
        to_ref[...] = (acct_ref[...] * inv_l - (r_ref[...] * inv_l) * o).astype(to_ref.dtype)
        lse_ref[...] = jnp.where(empty, -jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _dkdv_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, dk_acc, dv_acc, *, spec, scale, bq, bk, steps):
    i, j = pl.program_id(2), pl.program_id(3)  # i: key tile
    prec = _prec(q_ref.dtype)
    kind = kind_ref[i * steps + j]

    @pl.when(j == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked):
        row0 = idx_ref[i * steps + j] * bq
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, prec, tb=True) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(_tile_mask(spec, row0, bq, i * bk, bk), p, 0.0)
        dv_acc[...] += _dot(p.astype(do.dtype), do, prec, ta=True)
        dp = _dot(do, v, prec, tb=True)
        ds = p * (dp - delta_ref[...])
        dk_acc[...] += _dot(ds.astype(q.dtype), q, prec, ta=True)

    pl.when(kind == 1)(lambda: step(False))
    pl.when(kind == 2)(lambda: step(True))

    @pl.when(j == steps - 1)
    def _fin():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(idx_ref, kind_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_acc,
               *, spec, scale, bq, bk, steps):
    i, j = pl.program_id(2), pl.program_id(3)
    prec = _prec(q_ref.dtype)
    kind = kind_ref[i * steps + j]

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros_like(dq_acc)

    def step(masked):
        col0 = idx_ref[i * steps + j] * bk
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot(q, k, prec, tb=True) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            p = jnp.where(_tile_mask(spec, i * bq, bq, col0, bk), p, 0.0)
        dp = _dot(do, v, prec, tb=True)
        ds = p * (dp - delta_ref[...])
        dq_acc[...] += _dot(ds.astype(k.dtype), k, prec)

    pl.when(kind == 1)(lambda: step(False))
    pl.when(kind == 2)(lambda: step(True))

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
    _check(q, k, v, spec)
    B, Lq, H, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    config = MosaicConfig() if config is None else config
    mult = config.pad_multiple
    return B, Lq, k.shape[1], H, D, scale, config, _padded(Lq, mult), _padded(k.shape[1], mult)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_forward(q, k, v, spec: MaskSpec, *, scale=None, config: MosaicConfig | None = None,
                   interpret=False):
    """q `[B, Lq, H, D]`, k/v `[B, Lk, H, D]` -> o `[B, Lq, H, D]`, lse `[B, H, Lq]` f32."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    bq, bk = config.fwd
    rows = Lqp // bq
    idx, kind, steps = _merged_schedule(spec, bq, bk, False, rows)
    kernel = functools.partial(_fwd_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, rows, steps),
            in_specs=[_row_spec(bq, D), _col_spec(bk, D, steps), _col_spec(bk, D, steps)],
            out_specs=[_row_spec(bq, D), _row_spec(bq, 1)],
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, 1), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Lqp, 1), jnp.float32)],
        compiler_params=_params(), interpret=_interp(interpret), name="crm_mosaic_fwd",
    )(jnp.asarray(idx), jnp.asarray(kind), _to_bhld(q, Lqp), _to_bhld(k, Lkp), _to_bhld(v, Lkp))
    return _from_bhld(o, Lq), lse[:, :, :Lq, 0]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_jvp(q, k, v, tq, tk, tv, spec: MaskSpec, *, scale=None,
               config: MosaicConfig | None = None, interpret=False):
    """(q, k, v) and tangents (or None for zero) -> o, to `[B, Lq, H, D]`, lse `[B, H, Lq]`."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    bq, bk = config.jvp
    rows = Lqp // bq
    idx, kind, steps = _merged_schedule(spec, bq, bk, False, rows)
    has = (tq is not None, tk is not None, tv is not None)
    in_specs = [_row_spec(bq, D), _col_spec(bk, D, steps), _col_spec(bk, D, steps)]
    args = [_to_bhld(q, Lqp), _to_bhld(k, Lkp), _to_bhld(v, Lkp)]
    for h_, t_, spec_, L_ in ((has[0], tq, _row_spec(bq, D), Lqp),
                              (has[1], tk, _col_spec(bk, D, steps), Lkp),
                              (has[2], tv, _col_spec(bk, D, steps), Lkp)):
        if h_:
            in_specs.append(spec_)
            args.append(_to_bhld(t_.astype(q.dtype), L_))
    kernel = functools.partial(_jvp_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps,
                               has_tq=has[0], has_tk=has[1], has_tv=has[2])
    o, to, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, rows, steps), in_specs=in_specs,
            out_specs=[_row_spec(bq, D), _row_spec(bq, D), _row_spec(bq, 1)],
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32), pltpu.VMEM((bq, D), jnp.float32),
                            pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, 1), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype),
                   jax.ShapeDtypeStruct((B, H, Lqp, 1), jnp.float32)],
        compiler_params=_params(), interpret=_interp(interpret), name="crm_mosaic_jvp",
    )(jnp.asarray(idx), jnp.asarray(kind), *args)
    return _from_bhld(o, Lq), _from_bhld(to, Lq), lse[:, :, :Lq, 0]


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def mosaic_backward(q, k, v, o, lse, do, spec: MaskSpec, *, scale=None,
                    config: MosaicConfig | None = None, interpret=False):
    """Residuals (q, k, v, o, lse) and do -> dq `[B, Lq, H, D]`, dk, dv `[B, Lk, H, D]`."""
    B, Lq, Lk, H, D, scale, config, Lqp, Lkp = _prologue(q, k, v, spec, scale, config)
    do = do.astype(q.dtype)
    delta = jnp.einsum("bqhd,bqhd->bhq", do.astype(jnp.float32), o.astype(jnp.float32))
    lse_s = jnp.where(jnp.isfinite(lse), lse, jnp.inf).astype(jnp.float32)
    lse_s = jnp.pad(lse_s, ((0, 0), (0, 0), (0, Lqp - Lq)), constant_values=jnp.inf)[..., None]
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, Lqp - Lq)))[..., None]
    qt, dot_ = _to_bhld(q, Lqp), _to_bhld(do, Lqp)
    kt, vt = _to_bhld(k, Lkp), _to_bhld(v, Lkp)

    bq, bk = config.dkdv
    rows = Lkp // bk
    idx, kind, steps = _merged_schedule(spec, bq, bk, True, rows)
    kernel = functools.partial(_dkdv_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps)
    qcol = _col_spec(bq, D, steps)
    vcol = _col_spec(bq, 1, steps)
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, rows, steps),
            in_specs=[qcol, _row_spec(bk, D), _row_spec(bk, D), qcol, vcol, vcol],
            out_specs=[_row_spec(bk, D), _row_spec(bk, D)],
            scratch_shapes=[pltpu.VMEM((bk, D), jnp.float32), pltpu.VMEM((bk, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lkp, D), k.dtype),
                   jax.ShapeDtypeStruct((B, H, Lkp, D), v.dtype)],
        compiler_params=_params(), interpret=_interp(interpret), name="crm_mosaic_dkdv",
    )(jnp.asarray(idx), jnp.asarray(kind), qt, kt, vt, dot_, lse_s, delta)

    bq, bk = config.dq
    rows = Lqp // bq
    idx, kind, steps = _merged_schedule(spec, bq, bk, False, rows)
    kernel = functools.partial(_dq_kernel, spec=spec, scale=scale, bq=bq, bk=bk, steps=steps)
    kcol = _col_spec(bk, D, steps)
    (dq,) = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, H, rows, steps),
            in_specs=[_row_spec(bq, D), kcol, kcol, _row_spec(bq, D), _row_spec(bq, 1),
                      _row_spec(bq, 1)],
            out_specs=[_row_spec(bq, D)],
            scratch_shapes=[pltpu.VMEM((bq, D), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, Lqp, D), q.dtype)],
        compiler_params=_params(), interpret=_interp(interpret), name="crm_mosaic_dq",
    )(jnp.asarray(idx), jnp.asarray(kind), qt, kt, vt, dot_, lse_s, delta)
    return _from_bhld(dq, Lq), _from_bhld(dk, Lk), _from_bhld(dv, Lk)


__all__ = ["MosaicConfig", "mosaic_forward", "mosaic_backward", "mosaic_jvp",
           "SUPPORTED_HEAD_DIMS"]
