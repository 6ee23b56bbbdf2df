"""umT5 encoder (Wan2.1's text encoder, `umt5-xxl` encoder) in Flax NNX.

Layouts:
  ids      `[B, L]` int32   token ids (T5 conventions: </s> = 1 ends the prompt, <pad> = 0)
  mask     `[B, L]`         1 for real tokens (prompt + </s>), 0 for padding
  output   `[B, L, d_model]` float32 hidden states after the final norm

Architecture (as transformers' `UMT5EncoderModel` and Wan2.1's `T5Encoder`): token
embedding; `num_layers` pre-norm blocks, each with its *own* bidirectional relative
position bias (`[num_buckets, num_heads]`), T5 RMSNorm (no mean, no bias), attention
without 1/sqrt(d) scaling (padding keys masked), and a gated-GELU FFN
`wo(gelu_tanh(wi_0 x) * wi_1 x)`; a final RMSNorm. The residual stream, norms and
softmax stay float32; matmuls run in `dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crm_jax.models.config import DtypeConfig
from crm_jax.models.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class UMT5Config(DtypeConfig):
    """Sizes and numerics of a umT5 encoder.

    Attributes:
      vocab_size: rows of the token embedding (umt5-xxl: 256384; the tokenizer uses fewer).
      d_model: hidden size; d_kv: per-head size (num_heads * d_kv may differ from d_model).
      d_ff: gated-FFN inner size.
      num_layers, num_heads: encoder blocks, attention heads.
      num_buckets, max_distance: relative position buckets (half per direction) and
        the distance beyond which all positions share the last bucket.
      eps: RMSNorm epsilon.
      text_len: tokens per prompt that Wan uses (pads/truncates to this).
      dtype: compute dtype of the matmuls; param_dtype: parameter dtype.
    """

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_buckets < 4 or self.num_buckets % 4:
            raise ValueError(f"num_buckets must be a positive multiple of 4, got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance {self.max_distance} must exceed num_buckets/4 = {self.num_buckets // 4}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv


UMT5_XXL = UMT5Config()
# Matches tests/fixtures/umt5_tiny (scripts/make_umt5_fixture.py).
UMT5_TINY = UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, text_len=64)
UMT5_CONFIGS = {"umt5_xxl": UMT5_XXL, "umt5_tiny": UMT5_TINY}


@functools.lru_cache(maxsize=32)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets `[q_len, k_len]` int32 of `key_pos - query_pos`.

    Half of the buckets are for keys after the query. Within a half, distances below
    a quarter of `num_buckets` get one bucket each, larger ones log-spaced buckets up
    to `max_distance`, beyond which all share the last. Computed in numpy float32 with
    the same operations (and truncation) as the PyTorch references.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    exact = half // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    with np.errstate(divide="ignore"):
        log_ratio = (
            np.log(dist.astype(np.float32) / np.float32(exact))
            / np.float32(math.log(max_distance / exact))
            * np.float32(half - exact)
        )
    large = np.minimum(exact + np.where(dist > 0, log_ratio, 0).astype(np.int64), half - 1)
    return (out + np.where(dist < exact, dist, large)).astype(np.int32)


def _linear(din: int, dout: int, cfg: UMT5Config, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)


class UMT5Attention(nnx.Module):
    """Self-attention with a per-layer relative position bias and no score scaling."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.k = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.v = _linear(cfg.d_model, cfg.inner_dim, cfg, rngs)
        self.o = _linear(cfg.inner_dim, cfg.d_model, cfg, rngs)
        self.rel_bias = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.num_buckets, cfg.num_heads), cfg.params_dtype)
            * (2 * cfg.num_buckets * cfg.num_heads) ** -0.5
        )

    def __call__(self, x, buckets, key_mask):
        """x `[B, L, d_model]`; buckets `[L, L]` int32; key_mask `[B, L]` bool -> `[B, L, d_model]`."""
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.d_kv)
        k = self.k(x).reshape(b, n, self.num_heads, self.d_kv)
        v = self.v(x).reshape(b, n, self.num_heads, self.d_kv)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        bias = jnp.take(self.rel_bias[...].astype(jnp.float32), buckets, axis=0)  # [L, L, H]
        s = s + bias.transpose(2, 0, 1)[None]
        s = jnp.where(key_mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, n, -1)
        return self.o(o)


class UMT5FFN(nnx.Module):
    """Gated GELU (tanh approximation): `wo(gelu(wi_0 x) * wi_1 x)`."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, cfg, rngs)
        self.wo = _linear(cfg.d_ff, cfg.d_model, cfg, rngs)

    def __call__(self, x):
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class UMT5Block(nnx.Module):
    """Pre-norm self-attention and FFN, each with a residual connection."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.norm1 = RMSNorm(cfg.d_model, cfg.eps, param_dtype=cfg.params_dtype)
        self.attn = UMT5Attention(cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, cfg.eps, param_dtype=cfg.params_dtype)
        self.ffn = UMT5FFN(cfg, rngs=rngs)

    def __call__(self, h, buckets, key_mask):
        """h `[B, L, d_model]` float32 residual stream -> same."""
        h = h + self.attn(self.norm1(h).astype(self.dtype), buckets, key_mask).astype(jnp.float32)
        return h + self.ffn(self.norm2(h).astype(self.dtype)).astype(jnp.float32)


class UMT5Encoder(nnx.Module):
    """umT5 encoder. See the module docstring for layouts."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), cfg.params_dtype)
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return UMT5Block(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(cfg.d_model, cfg.eps, param_dtype=cfg.params_dtype)

    def __call__(self, ids, mask=None, *, zero_padding: bool = False):
        """Encode token ids.

        Args:
          ids: `[B, L]` int token ids.
          mask: `[B, L]` (bool or 0/1) real-token mask; None = all tokens are real.
            Padding keys are masked out of every attention.
          zero_padding: zero the outputs at padded positions (what Wan feeds its DiT:
            each prompt's `[:length]` embeddings, zero-padded).
        Returns:
          `[B, L, d_model]` float32.
        """
        cfg = self.cfg
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, L], got {tuple(ids.shape)}")
        if mask is None:
            mask = jnp.ones(ids.shape, bool)
        elif tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of ids {tuple(ids.shape)}")
        key_mask = mask.astype(bool)
        n = ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(n, n, cfg.num_buckets, cfg.max_distance))
        h = jnp.take(self.token_embedding[...], ids.astype(jnp.int32), axis=0).astype(jnp.float32)

        graphdef, block_state = nnx.split(self.blocks)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, buckets, key_mask), None

        h, _ = jax.lax.scan(body, h, block_state)
        h = self.norm(h)
        if zero_padding:
            h = jnp.where(key_mask[..., None], h, 0.0)
        return h


def init_encoder(cfg: UMT5Config, seed: int = 0) -> UMT5Encoder:
    """A umT5 encoder with random parameters."""
    return UMT5Encoder(cfg, rngs=nnx.Rngs(seed))


def encode_fn(model: UMT5Encoder):
    """A jitted `f(ids [B, L], mask [B, L]) -> [B, L, d_model]` float32 with padding zeroed."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state)  # once: loaded parameters may be host numpy arrays

    @jax.jit
    def f(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask, zero_padding=True)

    return lambda ids, mask: f(state, jnp.asarray(ids), jnp.asarray(mask))
