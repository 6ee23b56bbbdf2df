"""Pieces of the flash kernels that the Triton (GPU) and Mosaic (TPU) lowerings share: input
checks, padding, the element-wise mask of a tile from its `MaskSpec`, the float32-result matmul,
and the online-softmax update (running max, rescale factor, probabilities, running row sums and
accumulators) with the backward's recomputed probabilities. The softmax pieces are pure functions
of arrays, parameterised by the exponential: Triton calls them with `jnp.exp2` on log2-scaled
scores and carries the results through its loop, Mosaic with `jnp.exp` on natural-log scores,
reading and writing its scratch refs around the calls. Row statistics are `[bq]` (Triton) or
`[bq, 1]` (Mosaic); the functions keep the shape they are given."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.masks import MaskSpec

SUPPORTED_HEAD_DIMS = (64, 128)


def check_inputs(q, k, v, spec: MaskSpec) -> None:
    """Raise unless q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]` share one dtype in (bfloat16,
    float32), have a supported head dim and fit `spec`'s lengths."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"flash kernels expect rank-4 [B, L, H, D] q, k, v; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q{q.shape}, k{k.shape}, v{v.shape}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {q.shape[-1]} not supported by the flash kernels (supported: {SUPPORTED_HEAD_DIMS})"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(
            f"flash kernels need q, k, v of one dtype in (bfloat16, float32); got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    spec.check_lengths(q.shape[1], k.shape[1])


def padded(n: int, mult: int) -> int:
    """`n` rounded up to a multiple of `mult`."""
    return -(-n // mult) * mult


def precision(dtype):
    """Matmul precision for operands of `dtype`: HIGHEST (IEEE fp32, not tf32) for float32."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot(a, b, prec, trans_a=False, trans_b=False):
    """2-D matmul `[m, k] @ [k, n] -> [m, n]` with a float32 result; `trans_*` contract over the
    other axis of that operand (no copies)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _block_of(spec: MaskSpec, pos):
    """Kernel-friendly `masks.block_of` for non-negative int32 positions."""
    frame = lax.div(pos, jnp.int32(spec.tokens_per_frame))
    later = lax.div(frame - spec.first_block_frames, jnp.int32(spec.block_frames)) + 1
    return jnp.where(frame >= spec.first_block_frames, later, 0)


def kernel_allowed(spec: MaskSpec, q_pos, k_pos):
    """Element-wise mask equal to `masks.allowed`, written with ops both lowerings have.

    q_pos `[bq, 1]`, k_pos `[1, bk]` int32 (non-negative) -> bool `[bq, bk]`.
    Block ids are computed on the vectors before broadcasting.
    """
    ok = jnp.logical_and(q_pos < spec.q_len, k_pos < spec.kv_len)
    if spec.kind == "full":
        return ok
    if spec.kind == "block_causal":
        qb = _block_of(spec, q_pos + spec.q_offset)
        kb = _block_of(spec, k_pos)
        ok = jnp.logical_and(ok, kb <= qb)
    else:  # teacher_forcing
        half = spec.q_len // 2
        qn = q_pos >= half
        kn = k_pos >= half
        qb = _block_of(spec, jnp.where(qn, q_pos - half, q_pos))
        kb = _block_of(spec, jnp.where(kn, k_pos - half, k_pos))
        kc = jnp.logical_not(kn)
        clean_q = jnp.logical_and(kc, kb <= qb)
        noisy_q = jnp.logical_or(jnp.logical_and(kc, kb < qb), jnp.logical_and(kn, kb == qb))
        # and/or only: Mosaic TPU has no layout for a select between boolean vectors.
        by_half = jnp.logical_or(jnp.logical_and(qn, noisy_q), jnp.logical_and(jnp.logical_not(qn), clean_q))
        ok = jnp.logical_and(ok, by_half)
    if spec.local_attn_blocks > 0:
        win = jnp.logical_or(kb > qb - spec.local_attn_blocks, kb < spec.sink_blocks)
        ok = jnp.logical_and(ok, win)
    return ok


def tile_mask(spec: MaskSpec, row0, bq: int, col0, bk: int):
    """bool `[bq, bk]`: the mask of the tile whose first query is `row0` and first key `col0`."""
    qp = row0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    kp = col0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return kernel_allowed(spec, qp, kp)


# ----------------------------------------------------------------------------- online softmax
def _column(x):
    """Row statistic `[bq]` or `[bq, 1]` -> `[bq, 1]`, to broadcast against a `[bq, n]` tile."""
    return x[:, None] if x.ndim == 1 else x


def softmax_probs(s, m, exp):
    """`exp(s - m)` per row: scores s `[bq, bk]`, row statistic m `[bq]` or `[bq, 1]` (the running
    max, or the backward's log-sum-exp) -> `[bq, bk]` float32."""
    return exp(s - _column(m))


def online_softmax_step(m_prev, s, exp):
    """The running max and probabilities after one key tile.

    m_prev `[bq]` or `[bq, 1]` float32 (running row max), s `[bq, bk]` float32 scores (-inf where
    masked) in the domain of `exp` (`jnp.exp2`: log2-scaled scores). Returns m_new and
    alpha = exp(m_prev - m_new), the factor that rescales what was summed under m_prev (both
    shaped like m_prev), and p = exp(s - m_new) `[bq, bk]`.
    """
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=m_prev.ndim == 2))
    alpha = exp(m_prev - m_new)
    p = softmax_probs(s, m_new, exp)
    return m_new, alpha, p


def running_sum(rescaled, t):
    """Row sum update: `rescaled` (the running sum times alpha, `[bq]` or `[bq, 1]`) plus the row
    sums of t `[bq, bk]`, in the shape of `rescaled`. With t = p the softmax denominator l; in
    the JVP, with t = p * ds, the sum r of the tangent of the probabilities."""
    return rescaled + jnp.sum(t, axis=1, keepdims=rescaled.ndim == 2)


def accumulate(rescaled, p, v, prec):
    """Accumulator update: `rescaled` (the accumulator `[bq, D]`, times alpha where the max moved)
    plus p `[bq, bk]` (cast to v's dtype) @ v `[bk, D]` -> `[bq, D]` float32."""
    return rescaled + dot(p.astype(v.dtype), v, prec)
