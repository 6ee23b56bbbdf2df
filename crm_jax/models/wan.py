"""Wan2.1 T2V diffusion transformer in Flax NNX, with causal attention and a KV cache.

Layouts (channels last):
  x        `[B, T, H, W, C]`   latent video (C = 16 for Wan's VAE)
  t        `[B, T]`            RF time in [0, 1] per latent frame (Wan's timestep is 1000 t)
  context  `[B, Ltxt, text_dim]` text-encoder embeddings (umT5: 512 x 4096)
  actions  `[B, T]` int        optional per-frame actions (world models)
  output   `[B, T, H, W, C]`   RF velocity v = eps - x0 (float32)

Per-frame times become per-token modulation, so context frames can sit at
t = 0 while others are noisy. The attention pattern (`AttentionPattern`) and an
optional `KVCache` select bidirectional, block-causal, teacher-forcing or
streaming use. The model holds no training logic.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from crm_jax.models import partitioning
from crm_jax.models.config import WanConfig
from crm_jax.models.layers import (MLP, AffineLayerNorm, RMSNorm, layer_norm, linear, patchify,
                                   timestep_embedding, unpatchify)
from crm_jax.models.rope import apply_rope, rope_angles
from pallas_kernels import masks

PATTERN_KINDS = ("full", "block_causal", "teacher_forcing")


@dataclasses.dataclass(frozen=True)
class AttentionPattern:
    """Which frames see which, in frames (the model turns it into a `MaskSpec`).

    kind: ``full`` (bidirectional), ``block_causal`` or ``teacher_forcing``
      (input packed `[clean | noisy]` along T; both halves share RoPE positions).
    block_frames: frames per attention block (1 = frame-wise, 3 = chunk-wise).
    first_block_frames: frames of the first block (default `block_frames`).
    local_attn_blocks, sink_blocks: optional sliding window with sink blocks.
    """

    kind: str = "full"
    block_frames: int = 1
    first_block_frames: int | None = None
    local_attn_blocks: int = 0
    sink_blocks: int = 0

    def __post_init__(self):
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"AttentionPattern.kind must be one of {PATTERN_KINDS}, got {self.kind!r}")
        if self.block_frames <= 0 or (self.first_block_frames is not None and self.first_block_frames <= 0):
            raise ValueError("block_frames and first_block_frames must be positive")

    @property
    def first(self) -> int:
        return self.block_frames if self.first_block_frames is None else self.first_block_frames

    def block_starts(self, num_frames: int) -> list[int]:
        """Frame indices where blocks start, within `num_frames` frames."""
        starts, f = [0], self.first
        while f < num_frames:
            starts.append(f)
            f += self.block_frames
        return starts

    def mask_spec(self, q_frames: int, tokens_per_frame: int, cache_frames: int = 0) -> masks.MaskSpec:
        """The MaskSpec of `q_frames` query frames after `cache_frames` cached frames."""
        kw = dict(local_attn_blocks=self.local_attn_blocks, sink_blocks=self.sink_blocks)
        if self.kind == "full":
            if cache_frames:
                raise ValueError("a KV cache needs a block_causal pattern, not full attention")
            return masks.full(q_frames * tokens_per_frame)
        if self.kind == "teacher_forcing":
            if cache_frames:
                raise ValueError("teacher_forcing packs its own clean context; do not pass a KV cache")
            if q_frames % 2:
                raise ValueError(f"teacher_forcing input packs [clean | noisy]: T must be even, got {q_frames}")
            return masks.teacher_forcing(q_frames // 2, tokens_per_frame, self.block_frames, self.first, **kw)
        if cache_frames and cache_frames not in self.block_starts(cache_frames + q_frames):
            raise ValueError(
                f"cached frames ({cache_frames}) must end on a block boundary; block starts are "
                f"{self.block_starts(cache_frames + q_frames)}")
        return masks.block_causal(cache_frames + q_frames, tokens_per_frame, self.block_frames,
                                  self.first, q_frames=q_frames, **kw)


FULL = AttentionPattern("full")


@flax.struct.dataclass
class KVCache:
    """Self-attention keys (after RoPE) and values of every layer.

    k, v: `[layers, B, max_tokens, heads, head_dim]`. Which prefix is valid is
    tracked by the caller (`cache_frames` of the model call), so shapes stay static.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def create(cls, cfg: WanConfig, batch: int, max_frames: int, tokens_per_frame: int,
               dtype=None) -> "KVCache":
        shape = (cfg.num_layers, batch, max_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim)
        dtype = cfg.compute_dtype if dtype is None else dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class Attention(nnx.Module):
    """Multi-head attention with RMSNorm on q and k across heads (Wan's qk norm)."""

    def __init__(self, cfg: WanConfig, kv_dim: int, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        self.num_heads = cfg.num_heads
        self.attn_impl = cfg.attn_impl
        self.attn_interpret = cfg.attn_interpret
        self.to_q = linear(cfg.dim, cfg.dim, rngs, dt, pdt)
        self.to_k = linear(kv_dim, cfg.dim, rngs, dt, pdt)
        self.to_v = linear(kv_dim, cfg.dim, rngs, dt, pdt)
        self.to_out = linear(cfg.dim, cfg.dim, rngs, dt, pdt)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps, param_dtype=pdt)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps, param_dtype=pdt)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.num_heads, -1)

    def project_kv(self, kv_input):
        """`[B, Lk, dim_in]` -> k, v `[B, Lk, H, D]` (k normalised, no RoPE)."""
        return self._heads(self.norm_k(self.to_k(kv_input))), self._heads(self.to_v(kv_input))

    def __call__(self, x, kv_input, spec, *, angles=None, cache_kv=None, cache_frames: int = 0,
                 write_cache: bool = False, ad: str = "vjp"):
        """x `[B, T, N, dim]` (frame-structured tokens); kv_input `[B, Lk, dim_kv]` (None: self-attention).

        For self-attention, `angles [T, N, D/2]` rotate q and k; `cache_kv = (k, v)`
        `[B, S, H, D]` (S = a multiple of N) prepends the first `cache_frames` cached
        frames (stop-gradient) to the keys.
        Returns (output `[B, T, N, dim]`, this call's keys and values `[B, T, N, H, D]`
        when `write_cache`, else None) -- the caller appends them to the cache.
        """
        b, t, n, _ = x.shape
        q = self._heads(self.norm_q(self.to_q(x)))
        k, v = self.project_kv(x if kv_input is None else kv_input)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        new_kv = (jax.lax.stop_gradient(k), jax.lax.stop_gradient(v)) if write_cache else None
        if cache_kv is not None and cache_frames:
            def cached(c, like):
                c = jax.lax.stop_gradient(c[:, :cache_frames * n]).astype(like.dtype)
                return c.reshape(b, cache_frames, n, *c.shape[2:])
            ck, cv = cache_kv
            k = jnp.concatenate([cached(ck, k), k], axis=1)
            v = jnp.concatenate([cached(cv, v), v], axis=1)
        o = partitioning.attend(q, k, v, spec, cross=kv_input is not None, impl=self.attn_impl, ad=ad,
                                interpret=self.attn_interpret)
        return self.to_out(o.reshape(b, t, n, -1)), new_kv


class WanBlock(nnx.Module):
    """Self-attention, cross-attention and FFN with per-token adaLN modulation."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        self.eps = cfg.eps
        self.attn1 = Attention(cfg, cfg.dim, rngs=rngs)
        self.attn2 = Attention(cfg, cfg.dim, rngs=rngs)
        self.norm2 = AffineLayerNorm(cfg.dim, cfg.eps, param_dtype=pdt)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, "gelu_tanh", rngs=rngs, dtype=dt, param_dtype=pdt)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (6, cfg.dim), pdt) / cfg.dim ** 0.5)
        self.dtype = dt

    def __call__(self, h, mod, context, self_spec, cross_spec, angles, cache_kv, cache_frames,
                 write_cache, ad):
        """h `[B, T, N, dim]` float32; mod `[B, T, 6, dim]`; context `[B, Ltxt, dim]`.

        Returns (h, this layer's new keys/values or None); see `Attention`.
        """
        mod = self.scale_shift_table[...].astype(jnp.float32) + mod
        shift, scale, gate, c_shift, c_scale, c_gate = [mod[:, :, i, None, :] for i in range(6)]

        x = (layer_norm(h, self.eps) * (1 + scale) + shift).astype(self.dtype)
        a, new_kv = self.attn1(x, None, self_spec, angles=angles, cache_kv=cache_kv,
                               cache_frames=cache_frames, write_cache=write_cache, ad=ad)
        h = partitioning.constrain_tokens(h + a.astype(jnp.float32) * gate)

        x = self.norm2(h).astype(self.dtype)
        a, _ = self.attn2(x, context, cross_spec, ad=ad)
        h = partitioning.constrain_tokens(h + a.astype(jnp.float32))

        x = (layer_norm(h, self.eps) * (1 + c_scale) + c_shift).astype(self.dtype)
        h = partitioning.constrain_tokens(h + self.ffn(x).astype(jnp.float32) * c_gate)
        return h, new_kv


class ConditionEmbedder(nnx.Module):
    """Time (sinusoid -> MLP -> 6-way modulation), text MLP, optional actions."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        pdt, dt = cfg.params_dtype, cfg.compute_dtype
        self.freq_dim = cfg.freq_dim
        self.timestep_scale = cfg.timestep_scale
        # The time path stays in float32, as in the reference implementation.
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, cfg.dim, "silu", rngs=rngs,
                                 dtype=jnp.float32, param_dtype=pdt)
        self.time_proj = linear(cfg.dim, 6 * cfg.dim, rngs, jnp.float32, pdt)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, cfg.dim, "gelu_tanh", rngs=rngs,
                                 dtype=dt, param_dtype=pdt)
        self.interval_embedder = (MLP(cfg.freq_dim, cfg.dim, cfg.dim, "silu", rngs=rngs,
                                      dtype=jnp.float32, param_dtype=pdt) if cfg.mean_flow else None)
        self.action_embedder = (nnx.Embed(cfg.num_actions, cfg.dim, param_dtype=pdt, rngs=rngs)
                                if cfg.num_actions else None)

    def __call__(self, t, context, actions=None, r=None):
        """t `[B, T]` -> temb `[B, T, dim]`, mod `[B, T, 6, dim]`; context -> `[B, Ltxt, dim]`."""
        temb = self.time_embedder(timestep_embedding(t * self.timestep_scale, self.freq_dim))
        if self.interval_embedder is not None:
            gap = jnp.zeros_like(t) if r is None else t - r
            temb = temb + self.interval_embedder(timestep_embedding(gap * self.timestep_scale, self.freq_dim))
        if self.action_embedder is not None and actions is not None:
            temb = temb + self.action_embedder(actions).astype(jnp.float32)
        mod = self.time_proj(jax.nn.silu(temb))
        mod = mod.reshape(*mod.shape[:-1], 6, -1)
        return temb, mod, self.text_embedder(context)


class WanModel(nnx.Module):
    """Wan2.1 T2V DiT. See the module docstring for layouts."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pt, ph, pw = cfg.patch_size
        pdt, dt = cfg.params_dtype, cfg.compute_dtype
        patch_in = pt * ph * pw * cfg.in_channels
        self.patch_embedding = linear(patch_in, cfg.dim, rngs, dt, pdt)
        self.condition_embedder = ConditionEmbedder(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return WanBlock(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.proj_out = linear(cfg.dim, pt * ph * pw * cfg.out_channels, rngs, dt, pdt)
        self.scale_shift_table = nnx.Param(
            jax.random.normal(rngs.params(), (2, cfg.dim), pdt) / cfg.dim ** 0.5)

    # ----------------------------------------------------------------- checks
    def check_inputs(self, x, t, context, actions):
        cfg = self.cfg
        pt, ph, pw = cfg.patch_size
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must be [B, T, H, W, C={cfg.in_channels}], got {tuple(x.shape)}")
        b, tt, h, w, _ = x.shape
        if tt % pt or h % ph or w % pw:
            raise ValueError(f"x spatial/temporal size {(tt, h, w)} is not divisible by patch {cfg.patch_size}")
        if tuple(t.shape) != (b, tt):
            raise ValueError(f"t must be per-frame [B, T] = {(b, tt)}, got {tuple(t.shape)}")
        if context.ndim != 3 or tuple(context.shape) != (b, cfg.text_len, cfg.text_dim):
            raise ValueError(
                f"context must be [B, text_len, text_dim] = {(b, cfg.text_len, cfg.text_dim)}, "
                f"got {tuple(context.shape)}")
        if actions is not None:
            if not cfg.num_actions:
                raise ValueError("actions given but the model has no action embedding (num_actions=0)")
            if tuple(actions.shape) != (b, tt):
                raise ValueError(f"actions must be [B, T] = {(b, tt)}, got {tuple(actions.shape)}")

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    # ----------------------------------------------------------------- forward
    def __call__(self, x, t, context, *, pattern: AttentionPattern = FULL, actions=None, r=None,
                 frame_pos=None, cache: KVCache | None = None, cache_frames: int = 0,
                 write_cache: bool = False, ad: str = "vjp"):
        """Predict the RF velocity.

        Args:
          x: `[B, T, H, W, C]` latents (for teacher forcing: `[clean | noisy]` along T).
          t: `[B, T]` RF times in [0, 1].
          context: `[B, text_len, text_dim]` text embeddings.
          pattern: the attention pattern.
          actions: optional `[B, T]` int action ids.
          r: optional `[B, T]` start times of MeanFlow's average velocity u(z, r, t)
            (models with `mean_flow=True`; default r = t, the instantaneous velocity).
          frame_pos: `[T]` temporal RoPE positions; default `cache_frames + arange(T)`
            (teacher forcing: `arange(T/2)` twice).
          cache: optional KV cache; the first `cache_frames` frames in it are
            attended to (READ); with `write_cache` this call's keys/values are
            stored after them (APPEND).
          ad: "vjp" (for jax.grad) or "jvp" (for jax.jvp) attention kernels.
        Returns:
          velocity `[B, T, H, W, C_out]` float32, and the updated cache if one was given.
        """
        cfg = self.cfg
        self.check_inputs(x, t, context, actions)
        if cache is None and (cache_frames or write_cache):
            raise ValueError("cache_frames / write_cache need a cache")
        b, tt, hh, ww, _ = x.shape
        pt, ph, pw = cfg.patch_size
        tq, hq, wq = tt // pt, hh // ph, ww // pw
        n = hq * wq
        spec = pattern.mask_spec(tq, n, cache_frames)
        cross_spec = masks.full(tq * n, context.shape[1])
        if cache is not None and cache.k.shape[1] != b:
            raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")

        if frame_pos is None:
            if pattern.kind == "teacher_forcing":
                half = jnp.arange(tq // 2)
                frame_pos = jnp.concatenate([half, half])
            else:
                frame_pos = cache_frames + jnp.arange(tq)
        angles = rope_angles(frame_pos, hq, wq, cfg.head_dim, cfg.rope_theta).reshape(tq, n, -1)

        h = self.patch_embedding(patchify(x.astype(cfg.compute_dtype), cfg.patch_size))
        h = partitioning.constrain_tokens(h.reshape(b, tq, n, cfg.dim).astype(jnp.float32))
        if r is not None:
            if not cfg.mean_flow:
                raise ValueError("r given but the model has no interval embedding (mean_flow=False)")
            if tuple(r.shape) != tuple(t.shape):
                raise ValueError(f"r must have t's shape {tuple(t.shape)}, got {tuple(r.shape)}")
            r = r[:, ::pt]
        temb, mod, ctx = self.condition_embedder(t[:, ::pt], context.astype(cfg.compute_dtype),
                                                 None if actions is None else actions[:, ::pt], r)

        graphdef, block_state = nnx.split(self.blocks)
        if write_cache and cache_frames * n + tq * n > cache.k.shape[2]:
            raise ValueError(f"KV cache of {cache.k.shape[2] // n} frames cannot hold "
                             f"{cache_frames} + {tq} frames")

        def body(h, xs):
            layer_state, ck, cv = xs
            block = nnx.merge(graphdef, layer_state)
            kv = None if ck is None else (ck, cv)
            return block(h, mod, ctx, spec, cross_spec, angles, kv, cache_frames, write_cache, ad)

        if cfg.remat == "block":
            body = jax.checkpoint(body)
        elif cfg.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

        # The cache is read layer by layer as a scan input; only this call's keys and
        # values come out of the scan (as `[layers, B, T, N, H, D]`) and are written
        # into the cache once afterwards, in place when the caller donates it.
        xs = (block_state, None, None) if cache is None else (block_state, cache.k, cache.v)
        h, new_kv = jax.lax.scan(body, h, xs)
        if cache is not None and write_cache:
            def append(buf, new):
                new = new.reshape(*new.shape[:2], tq * n, *new.shape[-2:]).astype(buf.dtype)
                return jax.lax.dynamic_update_slice(buf, new, (0, 0, cache_frames * n, 0, 0))
            cache = KVCache(append(cache.k, new_kv[0]), append(cache.v, new_kv[1]))

        shift_scale = self.scale_shift_table[...].astype(jnp.float32)[None, None] + temb[:, :, None, :]
        shift, scale = shift_scale[:, :, 0, None, :], shift_scale[:, :, 1, None, :]
        out = (layer_norm(h, cfg.eps) * (1 + scale) + shift).astype(cfg.compute_dtype)
        out = self.proj_out(out).astype(jnp.float32)
        out = unpatchify(out.reshape(b, tq, hq, wq, -1), cfg.patch_size, cfg.out_channels)
        if cache is None:
            return out
        return out, cache


def init_model(cfg: WanConfig, seed: int = 0) -> WanModel:
    """Build a model with random parameters."""
    return WanModel(cfg, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=None)
def apply_for(cfg: WanConfig):
    """The functional `apply` of a config's architecture, without allocating parameters."""
    return functional(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))[0]


def functional(model: WanModel):
    """Split a model into a pure `apply(params, x, t, context, **kw)` and its params.

    `apply` rebuilds the module from `params` on every call (cheap under jit), so it
    can be used inside `jax.jit`, `jax.jvp`, `jax.grad` and `lax.scan` without
    mutating NNX state. Keyword arguments are those of `WanModel.__call__`. Models
    of the same structure share one `apply`, so jitted functions keyed on it (and
    their compilations) are reused across, e.g., teacher and student.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        return _make_apply(graphdef, rest), params
    return _shared_apply(graphdef), params


def _make_apply(graphdef, rest):
    def apply(params, x, t, context, **kw):
        return nnx.merge(graphdef, params, rest)(x, t, context, **kw)

    return apply


@functools.lru_cache(maxsize=64)
def _shared_apply(graphdef):
    def apply(params, x, t, context, **kw):
        return nnx.merge(graphdef, params)(x, t, context, **kw)

    return apply
