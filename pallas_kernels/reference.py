"""XLA attention with a `MaskSpec` and an optional valid key length: the one oracle of every
kernel (Triton, Mosaic, the Hopper KV-cache kernel) and the CPU path.

Plain jnp, so `jax.jvp`, `jax.grad` and `jax.vmap` all work. It materialises
the `[B, H, Lq, Lk]` score matrix: for tests and small models only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.masks import MaskSpec, allowed


def check_qkv(q, k, v, spec: MaskSpec | None = None):
    """Validate `q [B, Lq, H, D]`, `k, v [B, Lk, H, D]`; raise ValueError naming shapes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q, k, v of rank 4 [B, L, H, D]; got q{tuple(q.shape)}, "
            f"k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)}, v{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q [B, Lq, H, D] and k [B, Lk, H, D] must agree on B, H, D; got q{tuple(q.shape)}, k{tuple(k.shape)}"
        )
    if spec is not None:
        spec.check_lengths(q.shape[1], k.shape[1])


def attention_reference(
    q,
    k,
    v,
    spec: MaskSpec | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    upcast: bool = True,
    kv_valid_len=None,
):
    """Masked softmax attention.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]`.
      spec: the attention pattern; its lengths must match Lq, Lk. None: every key (full).
      scale: score scale, default `D ** -0.5`.
      return_lse: also return the log-sum-exp of the scaled scores `[B, H, Lq]`.
      upcast: compute in float32 (or float64 if inputs are float64).
      kv_valid_len: int or int32 scalar `[]` (may be traced): only keys `[0, kv_valid_len)` are
        attended (a KV cache's filled prefix); keys past it are never read into the result.
    Returns:
      `o [B, Lq, H, D]` in q's dtype (and `lse [B, H, Lq]` in float32/64).
      Rows with no allowed key give 0 output and lse = -inf.
    """
    check_qkv(q, k, v, spec)
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    out_dtype = q.dtype
    if upcast:
        ct = jnp.promote_types(q.dtype, jnp.float32)
        q, k, v = q.astype(ct), k.astype(ct), v.astype(ct)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=jax.lax.Precision.HIGHEST) * scale
    if spec is not None and spec.kind != "full":
        mask = jnp.asarray(allowed(spec, np.arange(spec.q_len)[:, None], np.arange(spec.kv_len)[None, :]))
        s = jnp.where(mask, s, -jnp.inf)
    if kv_valid_len is not None:
        s = jnp.where(jnp.arange(k.shape[1]) < kv_valid_len, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - jax.lax.stop_gradient(m_safe))
    l = jnp.sum(p, axis=-1, keepdims=True)
    l_safe = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhqk,bkhd->bqhd", p / l_safe, v, precision=jax.lax.Precision.HIGHEST)
    o = o.astype(out_dtype)
    if return_lse:
        lse = jnp.where(l[..., 0] > 0, jnp.log(l_safe[..., 0]) + m_safe[..., 0], -jnp.inf)
        return o, lse
    return o
