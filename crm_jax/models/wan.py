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
import numpy as np
from einops import rearrange
from flax import nnx

from crm_jax.models import partitioning
from crm_jax.models.config import WanConfig
from crm_jax.models.layers import (
    MLP,
    AffineLayerNorm,
    RMSNorm,
    layer_norm,
    linear,
    patchify,
    timestep_embedding,
    unpatchify,
)
from crm_jax.models.rope import apply_rope_tables, rope_angles, rope_tables
from pallas_kernels import masks
from pallas_kernels.ops import attention_kv_prefix
from pallas_kernels.ops import unmasked as ops_unmasked

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
                f"{self.block_starts(cache_frames + q_frames)}"
            )
        return masks.block_causal(
            cache_frames + q_frames, tokens_per_frame, self.block_frames, self.first, q_frames=q_frames, **kw
        )


FULL = AttentionPattern("full")


@flax.struct.dataclass
class KVCache:
    """Self-attention keys (after RoPE) and values of every layer.

    k, v: tuples of `layers` buffers `[B, max_tokens, heads, head_dim]`, one per layer, so a
    layer writes and reads its own buffer without copying the others. Which prefix is valid
    is tracked by the caller (`cache_frames` of the model call), so shapes stay static.
    """

    k: tuple
    v: tuple

    @classmethod
    def create(cls, cfg: WanConfig, batch: int, max_frames: int, tokens_per_frame: int, dtype=None) -> KVCache:
        dtype = cfg.compute_dtype if dtype is None else dtype
        shape = (batch, max_frames * tokens_per_frame, cfg.num_heads, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(zeros(), zeros())

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_tokens(self) -> int:
        return self.k[0].shape[1]

    def map_buffers(self, fn) -> KVCache:
        """Apply `fn` to every buffer (`[B, max_tokens, heads, head_dim]`)."""
        return KVCache(tuple(fn(a) for a in self.k), tuple(fn(a) for a in self.v))


@flax.struct.dataclass
class TextKV:
    """Cross-attention keys and values of a text for every layer (`WanModel.text_kv`).

    The text is the same for every call of a video, so a sampler computes these once and
    passes them as the model's `context`; the layers then do not project the text again.
    k, v: tuples of `layers` arrays `[B, text_len, heads, head_dim]` (k RMS-normalised, no RoPE).
    """

    k: tuple
    v: tuple


sg = jax.lax.stop_gradient


@jax.custom_jvp
def _with_new_tangent(buf, new, start):
    """`buf [B, S, H, D]`, which already holds `new [B, L, H, D]` at `start` along axis 1,
    given the tangent of `new` there (zero elsewhere).

    Lets attention read this call's keys from the cache buffer they were written to while
    their gradients still reach the projections; without autodiff it is the identity.
    """
    del new, start
    return buf


@_with_new_tangent.defjvp
def _with_new_tangent_jvp(primals, tangents):
    buf, new, start = primals
    dnew = tangents[1]
    dbuf = jax.lax.dynamic_update_slice(jnp.zeros_like(buf), dnew.astype(buf.dtype), (0, start, 0, 0))
    return buf, dbuf


def _flat_tokens(x):
    """`[B, T, N, H, D]` -> `[B, T * N, H, D]`."""
    return rearrange(x, "b t n h d -> b (t n) h d")


def _cache_kv(ck, cv, cache_frames, spec, ad: str):
    """The self-attention of a cached call, on one layer's buffers `ck, cv` `[B, S, H, D]`.

    Writes this call's keys/values at frame `cache_frames` (in place when the buffer is
    donated) and attends to the buffer's first `cache_frames + T` frames: by valid length
    over the whole buffer (`ops.attention_kv_prefix` with the config's `cache_attn_impl`, no
    copy) when every query sees every one of those keys on one device (`spec` unmasked, or
    None for a traced `cache_frames`), else with `spec`'s mask over that prefix. Returns
    (output, (new ck, new cv)); the new buffers are stop-gradient, while gradients of this
    call's keys and values reach their projections.
    """

    def fn(attn, q, k, v):
        b, t, n = q.shape[:3]
        start, end = cache_frames * n, (cache_frames + t) * n

        def write(buf, new):
            flat = _flat_tokens(new).astype(buf.dtype)
            buf = jax.lax.dynamic_update_slice(sg(buf), sg(flat), (0, start, 0, 0))
            return buf, _with_new_tangent(buf, flat, start).astype(new.dtype)

        ck2, kb = write(ck, k)
        cv2, vb = write(cv, v)
        one_device = partitioning.active_axes()[2] is None
        if spec is None or (one_device and ops_unmasked(spec)):
            if not one_device:
                raise ValueError("a traced cache_frames runs on one device; under a device mesh pass a Python int")
            o = attention_kv_prefix(
                _flat_tokens(q),
                kb,
                vb,
                end,
                impl=attn.cache_attn_impl,
                ad=ad,
                interpret=attn.attn_interpret,
                **attn._tiles(attn.cache_attn_impl),
            )
            o = o.reshape(q.shape)
        else:
            frames = lambda a: rearrange(a[:, :end], "b (t n) h d -> b t n h d", n=n)
            o = attn.attend(q, frames(kb), frames(vb), spec, cross=False, ad=ad)
        return o, (ck2, cv2)

    return fn


class Attention(nnx.Module):
    """Multi-head attention with RMSNorm on q and k across heads (Wan's qk norm)."""

    def __init__(self, cfg: WanConfig, kv_dim: int, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        self.num_heads = cfg.num_heads
        run = cfg.runtime
        self.attn_impl = run.attn_impl
        self.cache_attn_impl = run.cache_impl
        self.cross_attn_impl = run.cross_attn_impl
        self.attn_interpret = run.attn_interpret
        self.attn_tiles = run.attn_tiles
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

    def attend(self, q, k, v, spec, *, cross: bool, ad: str):
        """`partitioning.attend` with this module's attention backend; cross-attention with
        `cross_attn_impl` set: `attention_kv_prefix` over all keys (q `[B, T, N, H, D]`, k, v `[B, Lk, H, D]`)."""
        if cross and self.cross_attn_impl != "auto":
            if partitioning.active_axes()[2] is not None:
                raise ValueError(
                    f"cross_attn_impl={self.cross_attn_impl!r} runs on one device; under a device "
                    "mesh use cross_attn_impl='auto'"
                )
            o = attention_kv_prefix(
                _flat_tokens(q),
                k,
                v,
                k.shape[1],
                impl=self.cross_attn_impl,
                ad=ad,
                interpret=self.attn_interpret,
                **self._tiles(self.cross_attn_impl),
            )
            return o.reshape(q.shape)
        return partitioning.attend(
            q,
            k,
            v,
            spec,
            cross=cross,
            impl=self.attn_impl,
            ad=ad,
            interpret=self.attn_interpret,
            **self._tiles(self.attn_impl),
        )

    def _tiles(self, impl: str) -> dict:
        """`tiles=` for the Pallas kernels when the config sets them (not for cuDNN / mgpu)."""
        return {} if self.attn_tiles is None or impl in ("mgpu", "cudnn") else {"tiles": self.attn_tiles}

    def __call__(self, x, kv_input, spec, *, rope=None, kv_fn=None, ad: str = "vjp", kv=None):
        """x `[B, T, N, dim]` (frame-structured tokens); kv_input `[B, Lk, dim_kv]` (None: self-attention).

        For self-attention, `rope = (cos, sin)` tables `[T, N, D/2]` rotate q and k, and
        `kv_fn(self, q, k, v) -> (o [B, T, N, H, D], extra)` (`_cache_kv`, for KV-cache calls)
        decides which keys q attends to. For cross-attention, `kv = (k, v)` `[B, Lk, H, D]`
        already projected (`project_kv`) replaces `kv_input`. Returns (output `[B, T, N, dim]`,
        extra or None).
        """
        b, t, n, _ = x.shape
        q = self._heads(self.norm_q(self.to_q(x)))
        cross = kv_input is not None or kv is not None
        k, v = kv if kv is not None else self.project_kv(x if kv_input is None else kv_input)
        if rope is not None:
            q, k = apply_rope_tables(q, *rope), apply_rope_tables(k, *rope)
        if kv_fn is None:
            o, extra = self.attend(q, k, v, spec, cross=cross, ad=ad), None
        else:
            o, extra = kv_fn(self, q, k, v)
        return self.to_out(o.reshape(b, t, n, -1)), extra


class WanBlock(nnx.Module):
    """Self-attention, cross-attention and FFN with per-token adaLN modulation."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        self.eps = cfg.eps
        self.attn1 = Attention(cfg, cfg.dim, rngs=rngs)
        self.attn2 = Attention(cfg, cfg.dim, rngs=rngs)
        self.norm2 = AffineLayerNorm(cfg.dim, cfg.eps, param_dtype=pdt)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, "gelu_tanh", rngs=rngs, dtype=dt, param_dtype=pdt)
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (6, cfg.dim), pdt) / cfg.dim**0.5)
        self.dtype = dt

    def __call__(self, h, mod, context, self_spec, cross_spec, rope, kv_fn, ad, text_kv=None):
        """h `[B, T, N, dim]` float32; mod `[B, T, 6, dim]`; context `[B, Ltxt, dim]`, or its
        cross-attention keys and values `text_kv = (k, v)` `[B, Ltxt, H, D]` (context unused).

        Returns (h, what the self-attention's `kv_fn` returned, or None); see `Attention`.
        """
        mod = self.scale_shift_table[...].astype(jnp.float32) + mod
        shift, scale, gate, c_shift, c_scale, c_gate = [mod[:, :, i, None, :] for i in range(6)]

        x = (layer_norm(h, self.eps) * (1 + scale) + shift).astype(self.dtype)
        a, extra = self.attn1(x, None, self_spec, rope=rope, kv_fn=kv_fn, ad=ad)
        h = partitioning.constrain_tokens(h + a.astype(jnp.float32) * gate)

        x = self.norm2(h).astype(self.dtype)
        a, _ = self.attn2(x, context, cross_spec, ad=ad, kv=text_kv)
        h = partitioning.constrain_tokens(h + a.astype(jnp.float32))

        x = (layer_norm(h, self.eps) * (1 + c_scale) + c_shift).astype(self.dtype)
        h = partitioning.constrain_tokens(h + self.ffn(x).astype(jnp.float32) * c_gate)
        return h, extra


class ConditionEmbedder(nnx.Module):
    """Time (sinusoid -> MLP -> 6-way modulation), text MLP, optional actions."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        pdt, dt = cfg.params_dtype, cfg.compute_dtype
        self.freq_dim = cfg.freq_dim
        self.timestep_scale = cfg.timestep_scale
        # The time path stays in float32, as in the reference implementation.
        self.time_embedder = MLP(cfg.freq_dim, cfg.dim, cfg.dim, "silu", rngs=rngs, dtype=jnp.float32, param_dtype=pdt)
        self.time_proj = linear(cfg.dim, 6 * cfg.dim, rngs, jnp.float32, pdt)
        self.text_embedder = MLP(cfg.text_dim, cfg.dim, cfg.dim, "gelu_tanh", rngs=rngs, dtype=dt, param_dtype=pdt)
        self.interval_embedder = (
            MLP(cfg.freq_dim, cfg.dim, cfg.dim, "silu", rngs=rngs, dtype=jnp.float32, param_dtype=pdt)
            if cfg.mean_flow
            else None
        )
        self.action_embedder = (
            nnx.Embed(cfg.num_actions, cfg.dim, param_dtype=pdt, rngs=rngs) if cfg.num_actions else None
        )

    def __call__(self, t, context, actions=None, r=None):
        """t `[B, T]` -> temb `[B, T, dim]`, mod `[B, T, 6, dim]`; context -> `[B, Ltxt, dim]` (None -> None)."""
        temb = self.time_embedder(timestep_embedding(t * self.timestep_scale, self.freq_dim))
        if self.interval_embedder is not None:
            gap = jnp.zeros_like(t) if r is None else t - r
            temb = temb + self.interval_embedder(timestep_embedding(gap * self.timestep_scale, self.freq_dim))
        if self.action_embedder is not None and actions is not None:
            temb = temb + self.action_embedder(actions).astype(jnp.float32)
        mod = self.time_proj(jax.nn.silu(temb))
        mod = mod.reshape(*mod.shape[:-1], 6, -1)
        return temb, mod, None if context is None else self.text_embedder(context)


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
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, cfg.dim), pdt) / cfg.dim**0.5)

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
        if isinstance(context, TextKV):
            _check_text_kv(cfg, context, b)
        elif context.ndim != 3 or tuple(context.shape) != (b, cfg.text_len, cfg.text_dim):
            raise ValueError(
                f"context must be [B, text_len, text_dim] = {(b, cfg.text_len, cfg.text_dim)}, "
                f"got {tuple(context.shape)}"
            )
        if actions is not None:
            if not cfg.num_actions:
                raise ValueError("actions given but the model has no action embedding (num_actions=0)")
            if tuple(actions.shape) != (b, tt):
                raise ValueError(f"actions must be [B, T] = {(b, tt)}, got {tuple(actions.shape)}")

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    def text_kv(self, context) -> TextKV:
        """Cross-attention keys and values of every layer for `context` `[B, text_len, text_dim]`
        (the text MLP, then each layer's `attn2.project_kv`). Pass it as the `context` of calls
        that share the text."""
        cfg = self.cfg
        if context.ndim != 3 or tuple(context.shape[1:]) != (cfg.text_len, cfg.text_dim):
            raise ValueError(
                f"context must be [B, text_len, text_dim] = [B, {cfg.text_len}, {cfg.text_dim}], "
                f"got {tuple(context.shape)}"
            )
        ctx = self.condition_embedder.text_embedder(context.astype(cfg.compute_dtype))
        graphdef, state = nnx.split(self.blocks)
        k, v = jax.vmap(lambda s: nnx.merge(graphdef, s).attn2.project_kv(ctx))(state)
        return TextKV(tuple(k), tuple(v))

    # ----------------------------------------------------------------- forward
    def __call__(
        self,
        x,
        t,
        context,
        pattern: AttentionPattern = FULL,
        *,
        actions=None,
        r=None,
        frame_pos=None,
        cache: KVCache | None = None,
        cache_frames=0,
        layer_params=None,
        ad: str = "vjp",
    ):
        """Predict the RF velocity.

        Args:
          x: `[B, T, H, W, C]` latents (for teacher forcing: `[clean | noisy]` along T).
          t: `[B, T]` RF times in [0, 1].
          context: `[B, text_len, text_dim]` text embeddings, or their `TextKV`
            (`WanModel.text_kv`, computed once for calls that share the text).
          pattern: the attention pattern.
          actions: optional `[B, T]` int action ids.
          r: optional `[B, T]` start times of MeanFlow's average velocity u(z, r, t)
            (models with `mean_flow=True`; default r = t, the instantaneous velocity).
          frame_pos: `[T]` temporal RoPE positions; default `cache_frames + arange(T)`
            (teacher forcing: `arange(T/2)` twice).
          cache: optional KV cache; the call attends to its first `cache_frames` frames and
            its own keys/values, which it writes after them into the returned cache. The
            layers run as a scan over the stacked parameters (and the cache's buffers), or,
            with `layer_params`, as a Python loop, each layer on its own buffers (`_cache_kv`).
          cache_frames: a Python int, or -- for a `block_causal` call of one block without a
            local window (T <= the block size), which sees the whole cache -- a traced int32,
            so one compilation serves every cache length (the caller keeps it in bounds).
          layer_params: optional per-layer block parameters (`split_layer_params`) for cached
            calls (the streaming sampler's layer loop), used instead of the stacked ones.
          ad: "vjp" (for jax.grad) or "jvp" (for jax.jvp) attention kernels.
        Returns:
          velocity `[B, T, H, W, C_out]` float32, and the updated cache if one was given.
        """
        cfg = self.cfg
        self.check_inputs(x, t, context, actions)
        if cache is None and (not _is_int(cache_frames) or cache_frames or layer_params is not None):
            raise ValueError("cache_frames / layer_params need a cache")
        b, tt, hh, ww, _ = x.shape
        pt, ph, pw = cfg.patch_size
        tq, hq, wq = tt // pt, hh // ph, ww // pw
        n = hq * wq
        traced = not _is_int(cache_frames)
        if traced:
            _check_traced_call(pattern, tq)
            spec = None
        else:
            spec = pattern.mask_spec(tq, n, cache_frames)
        text_kv = context if isinstance(context, TextKV) else None
        cross_spec = masks.full(tq * n, cfg.text_len)
        if cache is not None:
            _check_cache(cfg, cache, b)
            if not traced and (cache_frames + tq) * n > cache.max_tokens:
                raise ValueError(f"KV cache of {cache.max_tokens // n} frames cannot hold {cache_frames} + {tq} frames")

        if frame_pos is None:
            if pattern.kind == "teacher_forcing":
                half = jnp.arange(tq // 2)
                frame_pos = jnp.concatenate([half, half])
            else:
                frame_pos = cache_frames + jnp.arange(tq)
        angles = rope_angles(frame_pos, hq, wq, cfg.head_dim, cfg.rope_theta).reshape(tq, n, -1)
        rope = rope_tables(angles)  # once per call, shared by every layer

        h = self.patch_embedding(patchify(x.astype(cfg.compute_dtype), cfg.patch_size))
        h = partitioning.constrain_tokens(rearrange(h, "b t hh ww c -> b t (hh ww) c").astype(jnp.float32))
        if r is not None:
            if not cfg.mean_flow:
                raise ValueError("r given but the model has no interval embedding (mean_flow=False)")
            if tuple(r.shape) != tuple(t.shape):
                raise ValueError(f"r must have t's shape {tuple(t.shape)}, got {tuple(r.shape)}")
            r = r[:, ::pt]
        temb, mod, ctx = self.condition_embedder(
            t[:, ::pt],
            None if text_kv is not None else context.astype(cfg.compute_dtype),
            None if actions is None else actions[:, ::pt],
            r,
        )

        run = _LayerRun(self, mod, ctx, spec, cross_spec, rope, ad, text_kv)
        if cache is None:
            h = run.scan(h)
        elif layer_params is None:
            h, cache = run.scan_cached(h, cache, cache_frames)
        else:
            h, cache = run.loop(h, cache, cache_frames, layer_params)

        shift_scale = self.scale_shift_table[...].astype(jnp.float32)[None, None] + temb[:, :, None, :]
        shift, scale = shift_scale[:, :, 0, None, :], shift_scale[:, :, 1, None, :]
        out = (layer_norm(h, cfg.eps) * (1 + scale) + shift).astype(cfg.compute_dtype)
        out = self.proj_out(out).astype(jnp.float32)
        out = unpatchify(rearrange(out, "b t (hh ww) c -> b t hh ww c", hh=hq), cfg.patch_size, cfg.out_channels)
        if cache is None:
            return out
        return out, cache


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer))


def _check_cache(cfg: WanConfig, cache: KVCache, batch: int) -> None:
    want = (cfg.num_heads, cfg.head_dim)
    if cache.num_layers != cfg.num_layers or len(cache.v) != cfg.num_layers:
        raise ValueError(f"KV cache has {cache.num_layers} layers, the model {cfg.num_layers}")
    for a in list(cache.k) + list(cache.v):
        if a.ndim != 4 or tuple(a.shape[-2:]) != want or a.shape[1] != cache.max_tokens:
            raise ValueError(f"KV cache buffers must be [B, S, {want[0]}, {want[1]}] per layer; got {tuple(a.shape)}")
    if cache.batch != batch:
        raise ValueError(f"cache batch {cache.batch} != input batch {batch}")


def _check_text_kv(cfg: WanConfig, text_kv: TextKV, batch: int) -> None:
    want = (batch, cfg.text_len, cfg.num_heads, cfg.head_dim)
    shapes = {tuple(a.shape) for a in list(text_kv.k) + list(text_kv.v)}
    if len(text_kv.k) != cfg.num_layers or len(text_kv.v) != cfg.num_layers or shapes != {want}:
        raise ValueError(
            f"a TextKV context must hold {cfg.num_layers} layers of k, v {want} (WanModel.text_kv); "
            f"got {len(text_kv.k)} layers of {sorted(shapes)}"
        )


def _check_traced_call(pattern: AttentionPattern, tq) -> None:
    """A traced `cache_frames` is only defined for one-block calls that see the whole cache."""
    if pattern.kind != "block_causal" or pattern.local_attn_blocks or tq > min(pattern.first, pattern.block_frames):
        raise ValueError(
            "a traced cache_frames needs a block_causal pattern without a local window and a call of "
            f"one block (T={tq} <= block frames {min(pattern.first, pattern.block_frames)}): the call must "
            "see the whole cached prefix, which is then masked by length only"
        )


class _LayerRun:
    """The transformer blocks of one model call.

    scan: `lax.scan` over the stacked parameters (calls without a cache).
    scan_cached: the same scan over the stacked parameters and the layers' cache buffers (cached
      calls without `layer_params`: training's self-forcing rollouts, where one compiled layer
      keeps the step's compile time independent of the depth).
    loop: a Python loop over the layers, each writing and reading its own cache buffers
      (`_cache_kv`), with `layer_params` (the streaming sampler: no per-call parameter slicing and
      each buffer updated in place).
    """

    def __init__(self, model: WanModel, mod, ctx, spec, cross_spec, rope, ad, text_kv=None):
        self.cfg = model.cfg
        self.graphdef, self.block_state = nnx.split(model.blocks)
        self.mod, self.ctx, self.spec, self.cross_spec, self.rope, self.ad = mod, ctx, spec, cross_spec, rope, ad
        self.text_kv = text_kv

    def _layer(self, state, h, kv_fn, text_kv=None):
        block = nnx.merge(self.graphdef, state)
        return block(h, self.mod, self.ctx, self.spec, self.cross_spec, self.rope, kv_fn, self.ad, text_kv)

    def _remat(self, fn):
        if self.cfg.runtime.remat == "block":
            return jax.checkpoint(fn)
        if self.cfg.runtime.remat == "dots":
            return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        return fn

    def scan(self, h):
        def body(h, xs):
            layer_state, tk, tv = xs
            h, _ = self._layer(layer_state, h, None, None if tk is None else (tk, tv))
            return h, None

        text = (None, None) if self.text_kv is None else (jnp.stack(self.text_kv.k), jnp.stack(self.text_kv.v))
        h, _ = jax.lax.scan(self._remat(body), h, (self.block_state, *text))
        return h

    def scan_cached(self, h, cache, cache_frames):
        def body(h, xs):
            layer_state, ck, cv, tk, tv = xs
            kv_fn = _cache_kv(ck, cv, cache_frames, self.spec, self.ad)
            h, kv = self._layer(layer_state, h, kv_fn, None if tk is None else (tk, tv))
            return h, kv

        text = (None, None) if self.text_kv is None else (jnp.stack(self.text_kv.k), jnp.stack(self.text_kv.v))
        xs = (self.block_state, jnp.stack(cache.k), jnp.stack(cache.v), *text)
        h, (ks, vs) = jax.lax.scan(self._remat(body), h, xs)
        return h, KVCache(tuple(ks), tuple(vs))

    def loop(self, h, cache, cache_frames, layer_params):
        num = self.cfg.num_layers
        if layer_params is not None:  # leaves of one layer each, in the stacked state's order
            treedef = jax.tree.structure(self.block_state)
            if len(layer_params) != num or any(len(lv) != treedef.num_leaves for lv in layer_params):
                raise ValueError(
                    f"layer_params must hold {num} layers of {treedef.num_leaves} arrays each (from split_layer_params)"
                )
            states = [jax.tree.unflatten(treedef, leaves) for leaves in layer_params]
        else:
            states = [jax.tree.map(lambda a, i=i: a[i], self.block_state) for i in range(num)]
        ks, vs = list(cache.k), list(cache.v)
        for i, state in enumerate(states):
            kv_fn = _cache_kv(ks[i], vs[i], cache_frames, self.spec, self.ad)
            tkv = None if self.text_kv is None else (self.text_kv.k[i], self.text_kv.v[i])
            h, (ks[i], vs[i]) = self._remat(lambda s, h, kv_fn=kv_fn, tkv=tkv: self._layer(s, h, kv_fn, tkv))(state, h)
        return h, KVCache(tuple(ks), tuple(vs))


def split_layer_params(params) -> tuple:
    """Per-layer block parameters for `WanModel.__call__(..., layer_params=...)`.

    params: from `functional(model)` (its `"blocks"` leaves are stacked `[layers, ...]`).
    Returns a tuple over layers of tuples of arrays: layer i's slice of every leaf of
    `params["blocks"]`, in `jax.tree.leaves` order (plain tuples, so a jitted call flattens
    them quickly). The slices are copies: holding them next to the stacked parameters
    costs one more copy of the blocks.
    """
    leaves = jax.tree.leaves(params["blocks"])
    return tuple(tuple(a[i] for a in leaves) for i in range(leaves[0].shape[0]))


def init_model(cfg: WanConfig, seed: int = 0) -> WanModel:
    """Build a model with random parameters."""
    return WanModel(cfg, rngs=nnx.Rngs(seed))


@functools.cache
def apply_for(cfg: WanConfig):
    """The functional `apply` of a config's architecture, without allocating parameters."""
    return functional(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))[0]


def functional(model: WanModel):
    """Split a model into a pure `apply(params, x, t, context, pattern, **kw)` and its params.

    `apply` rebuilds the module from `params` on every call (cheap under jit), so it
    can be used inside `jax.jit`, `jax.jvp`, `jax.grad` and `lax.scan` without
    mutating NNX state. Arguments are those of `WanModel.__call__`;
    `apply.text_kv(params, context)` is the pure `WanModel.text_kv`. Models of the same
    structure share one `apply`, so jitted functions keyed on it (and their compilations)
    are reused across, e.g., teacher and student.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        return _make_apply(graphdef, rest), params
    return _shared_apply(graphdef), params


def _make_apply(graphdef, rest):
    def apply(params, x, t, context, pattern=FULL, **kw):
        return nnx.merge(graphdef, params, rest)(x, t, context, pattern, **kw)

    apply.text_kv = lambda params, context: nnx.merge(graphdef, params, rest).text_kv(context)
    return apply


@functools.lru_cache(maxsize=64)
def _shared_apply(graphdef):
    def apply(params, x, t, context, pattern=FULL, **kw):
        return nnx.merge(graphdef, params)(x, t, context, pattern, **kw)

    apply.text_kv = lambda params, context: nnx.merge(graphdef, params).text_kv(context)
    return apply
