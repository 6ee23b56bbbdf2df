"""Toy-world "latents": pixels folded into channels (space-to-depth), no VAE.

frames `[..., T, H, W, 3]` in [0, 1]  <->  latents `[..., T, H/f, W/f, 3 f²]` in [-1, 1]
(f = factor, default 2 -> 12 channels; a toy model config then uses
in_channels = out_channels = 12). Channel order within a latent pixel is
(row offset, column offset, RGB), row-major. Works on numpy and JAX arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from einops import rearrange


def _xp(a):
    return np if isinstance(a, np.ndarray) else jnp


def latent_channels(factor: int = 2) -> int:
    return 3 * factor * factor


def frames_to_latents(frames, factor: int = 2):
    """`[..., H, W, 3]` in [0, 1] -> `[..., H/f, W/f, 3 f²]` in [-1, 1]."""
    if frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [..., H, W, 3], got {tuple(frames.shape)}")
    h, w = frames.shape[-3:-1]
    if factor < 1 or h % factor or w % factor:
        raise ValueError(f"frame size {(h, w)} is not divisible by factor {factor}")
    x = rearrange(frames, "... (h fh) (w fw) c -> ... h w (fh fw c)", fh=factor, fw=factor)
    return x * 2.0 - 1.0


def latents_to_frames(latents, factor: int = 2, clip: bool = True):
    """Inverse of `frames_to_latents`: `[..., h, w, 3 f²]` -> `[..., h f, w f, 3]` in [0, 1]."""
    xp = _xp(latents)
    if latents.ndim < 3 or latents.shape[-1] != 3 * factor * factor:
        raise ValueError(
            f"latents must be [..., h, w, {3 * factor * factor}] for factor {factor}, got {tuple(latents.shape)}"
        )
    x = rearrange(latents, "... h w (fh fw c) -> ... (h fh) (w fw) c", fh=factor, fw=factor)
    x = (x + 1.0) * 0.5
    return xp.clip(x, 0.0, 1.0) if clip else x
