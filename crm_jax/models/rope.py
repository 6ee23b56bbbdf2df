"""3D rotary position embedding of Wan: head_dim split over (time, height, width).

With head_dim D, the height and width parts get `2 * (D // 6)` channels each and
time gets the rest. Channels are rotated in interleaved pairs `(2i, 2i+1)`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _angles(pos, dim: int, theta: float):
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim))
    return pos.astype(jnp.float32)[:, None] * jnp.asarray(inv, jnp.float32)


def rope_angles(frame_pos, height: int, width: int, head_dim: int, theta: float = 10000.0):
    """Rotation angles `[T, H, W, head_dim // 2]` for token grid positions.

    Args:
      frame_pos: `[T]` integer temporal positions (shared by the clean and noisy
        halves of a teacher-forcing sequence; offset by the cache in streaming).
      height, width: the token grid after patching.
    """
    dt, dh, dw = rope_split(head_dim)
    t = len(frame_pos) if not hasattr(frame_pos, "shape") else frame_pos.shape[0]
    at = _angles(jnp.asarray(frame_pos), dt, theta)
    ah = _angles(jnp.arange(height), dh, theta)
    aw = _angles(jnp.arange(width), dw, theta)
    at = jnp.broadcast_to(at[:, None, None, :], (t, height, width, dt // 2))
    ah = jnp.broadcast_to(ah[None, :, None, :], (t, height, width, dh // 2))
    aw = jnp.broadcast_to(aw[None, None, :, :], (t, height, width, dw // 2))
    return jnp.concatenate([at, ah, aw], axis=-1)


def rope_tables(angles):
    """`(cos, sin)` of `angles [*tokens, D // 2]`, float32: compute once, rotate many tensors."""
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope_tables(x, cos, sin):
    """Rotate `x [B, *tokens, H, D]` by the tables of `rope_tables` (interleaved pairs), in float32.

    Pair (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as `x * cos + swap(x) * (-sin, sin)`:
    one element-wise expression (no concatenation), bitwise equal to the two-term form.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    c = cos[None, ..., None, :, None]
    s = sin[None, ..., None, :, None] * jnp.asarray([-1.0, 1.0], jnp.float32)
    out = x * c + x[..., ::-1] * s
    return out.reshape(*out.shape[:-2], -1).astype(dtype)
