"""Small building blocks of the Wan DiT: norms, embeddings, MLPs, (un)patchify."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx


def layer_norm(x, eps: float, scale=None, bias=None):
    """LayerNorm over the last axis, computed in float32. Returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale over the last axis (float32 statistics)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(dtype)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with learned scale and bias (float32)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x):
        return layer_norm(x, self.eps, self.weight[...], self.bias[...])


def linear(din: int, dout: int, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class MLP(nnx.Module):
    """linear_1 -> activation -> linear_2."""

    def __init__(self, din: int, dhidden: int, dout: int, activation: str, *, rngs, dtype, param_dtype):
        self.activation = activation
        self.linear_1 = linear(din, dhidden, rngs, dtype, param_dtype)
        self.linear_2 = linear(dhidden, dout, rngs, dtype, param_dtype)

    def __call__(self, x):
        h = self.linear_1(x)
        h = jax.nn.silu(h) if self.activation == "silu" else jax.nn.gelu(h, approximate=True)
        return self.linear_2(h)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding `[..., dim]` of timesteps `t [...]`, ordered [cos | sin]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x, patch: tuple[int, int, int]):
    """`[B, T, H, W, C]` -> `[B, T', H', W', pt*ph*pw*C]` with the (pt, ph, pw, C) order."""
    pt, ph, pw = patch
    return rearrange(x, "b (t pt) (h ph) (w pw) c -> b t h w (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(x, patch: tuple[int, int, int], channels: int):
    """Inverse of `patchify`: `[B, T', H', W', pt*ph*pw*C]` -> `[B, T, H, W, C]`."""
    pt, ph, pw = patch
    return rearrange(x, "b t h w (pt ph pw c) -> b (t pt) (h ph) (w pw) c", pt=pt, ph=ph, pw=pw, c=channels)
