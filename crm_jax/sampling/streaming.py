"""Streaming few-step generation over the KV cache (chunk by chunk).

Per chunk of `f` frames (frames [s, e)), with RF grid t_0 > ... > t_{n-1} > t_n = 0:

    x = noise                                   # [B, f, H, W, C], placed at t_0
    for i < n - 1:  x0 = x - t_i v(x, t_i | cache);  x = (1 - t_{i+1}) x0 + t_{i+1} eps_i
    x0 = x - t_{n-1} v(x, t_{n-1} | cache)      # the chunk's output
    clean context: re-run v(x0, t = 0), which writes the cache (one extra forward)
    noisy context: the last denoising step itself writes the cache (no extra forward)

The chunk is handed over as soon as its denoising calls are done; the clean-context re-run,
which only fills the cache for the next chunk, is its own dispatch right after them (the
last chunk of a finite video skips it: nothing reads that cache).

All noise comes from `chunk_noise` (keys folded from one PRNG key by chunk index), so
the non-streaming `reference.reference_generate` can reproduce it exactly.

Each chunk is one jitted call (`jax.jit`, cache donated) whose model calls run in a loop
with a compile-time trip count (XLA never reads the loop predicate back to the host, so the
dispatch is asynchronous and `stream(prefetch=True)` queues the next chunk while the caller
handles this one). The text's cross-attention keys and values are computed once per video
(`WanModel.text_kv`). The KV cache holds one buffer per layer and the sampler one copy of
the block parameters per layer, so a call copies no slice of either; each layer writes its
keys into its buffer and attends to it by valid length. Where the cache attention backend
takes a traced length (`prefix_len_can_be_traced`), the cache length is a traced argument
and one compile serves every cache layout of a chunk shape and step count; otherwise each
layout (sink/evict/cache frames) is compiled once. With a rolling window the layout reaches
a steady state after `sink_blocks + local_attn_blocks` chunks and the same compiled function
is reused from then on (flat memory).

RoPE positions: every call passes `frame_pos` = absolute frame indices, so keys in
the cache keep the positions they were written with, also after the window part
is shifted. Angles are computed directly (`pos * inv_freq` in float32; no table),
so there is no hard limit; positions are exact integers up to 2**24 and the angle
error grows like 6e-8 * pos rad (6e-3 rad at pos 1e5). Positions beyond the
trained length are an extrapolation: inside the local window the query-key
offsets stay within what the model saw in training (RoPE is relative), but the
sink blocks sit at ever larger offsets, which the model never saw -- quality over
very long rollouts depends on how the model was trained (e.g. with a window).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax.diffusion import rf_noise, x0_from_v
from crm_jax.models.config import WanConfig
from crm_jax.models.wan import AttentionPattern, KVCache, split_layer_params
from crm_jax.sampling.actions import ActionSource
from crm_jax.sampling.plan import (
    CONTEXT_MODES,
    CacheLayout,
    ChunkLayout,
    TimeSchedule,
    check_length,
    check_pattern,
    chunk_bounds,
    make_schedule,
)
from pallas_kernels._jax_private import jit_cache_size
from pallas_kernels.ops import prefix_len_can_be_traced


class Chunk(NamedTuple):
    """One generated chunk: frames [start, start + f) of the video.

    frames: `[B, f, H, W, C]` float32 clean latents x̂0 (a device array; may still be computing).
    actions: `[B, f]` int32 ids used for it, or None.
    """

    index: int
    start: int
    frames: jax.Array
    actions: np.ndarray | None


def chunk_noise(
    key: jax.Array, index: int | jax.Array, shape: tuple[int, ...], step: int | jax.Array, dtype=jnp.float32
) -> jax.Array:
    """Noise of chunk `index`: step 0 = initial noise, step i >= 1 = re-noise before step i.

    key -> fold_in(key, index) -> fold_in(., step) -> normal(shape).
    """
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, index), step), shape, dtype)


@functools.partial(jax.jit, static_argnames=("shape", "count"))
def chunk_noises(key: jax.Array, index, shape: tuple[int, ...], count: int) -> jax.Array:
    """`[count, *shape]`: `chunk_noise(key, index, shape, s)` for s < count, in one jitted call.

    Kept out of the chunk function: threefry is slow to compile on CPU, and this way it
    compiles once per chunk shape instead of once per cache layout.
    """
    return jax.vmap(lambda s: chunk_noise(key, index, shape, s))(jnp.arange(count))


def noise_count(schedule: TimeSchedule) -> int:
    """Noise draws per chunk (fixed for a schedule, >= 6, so `chunk_noises` compiles once per shape)."""
    return max(4, schedule.max_steps) + 2


def padded_times(schedule: TimeSchedule, chunk: int) -> tuple[np.ndarray, int]:
    """(grid of chunk zero-padded to `[noise_count(schedule)]` float32, n steps).

    One length for every step count, so the chunk function compiles once for all of them.
    """
    g = schedule.grid(chunk)
    out = np.zeros(noise_count(schedule), np.float32)
    out[: len(g)] = g
    return out, len(g) - 1


def buffer_pattern(cache_frames: int, frames: int) -> AttentionPattern:
    """Pattern of one cached call: the buffer is one block, the chunk another (sees all of it)."""
    return AttentionPattern("block_causal", block_frames=frames, first_block_frames=cache_frames or None)


def _shift_window(cache: KVCache, sink_tok: int, evict_tok: int, end_tok: int) -> KVCache:
    """Drop tokens [sink_tok, sink_tok + evict_tok) by moving [.., end_tok) left (static offsets)."""
    if evict_tok == 0:
        return cache

    def shift(a):
        return a.at[:, sink_tok : end_tok - evict_tok].set(a[:, sink_tok + evict_tok : end_tok])

    return cache.map_buffers(shift)


def _call_kwargs(static: tuple, f: int, cache_frames, actions, frame_pos, layer_params) -> dict:
    """Model keyword arguments of a chunk's calls (see `_chunk_fn` for `static`)."""
    static_frames = static[2]
    traced = static_frames is None
    pattern = AttentionPattern("block_causal", block_frames=f) if traced else buffer_pattern(static_frames, f)
    return dict(
        pattern=pattern,
        actions=actions,
        frame_pos=frame_pos,
        cache_frames=cache_frames if traced else static_frames,
        layer_params=layer_params,
    )


def _model_step(apply, params, x, cache, noise, text_kv, times, j, kw):
    """Model call j of a chunk: x̂0 = x - t_j v(x, t_j), then x <- (1 - t_{j+1}) x̂0 + t_{j+1} eps_{j+1}."""
    b, f = x.shape[:2]
    t = jnp.full((b, f), times[j], jnp.float32)
    v, cache = apply(params, x, t, text_kv, cache=cache, **kw)
    x0 = x0_from_v(x, t, v)
    t_next = jnp.full((b, f), times[j + 1], jnp.float32)
    return rf_noise(x0, noise[j + 1], t_next), cache


def _window_end(static: tuple, tpf: int, cache: KVCache) -> int:
    sink, evict, static_frames = static
    return cache.max_tokens if static_frames is None else (static_frames + evict) * tpf


def _chunk_fn(
    apply,
    params,
    cache,
    noise,
    text_kv,
    actions,
    frame_pos,
    times,
    cache_frames,
    layer_params,
    *,
    num_calls: int,
    static: tuple,
    tpf: int,
    x_shape: tuple,
):
    """One chunk: evict, denoise. Returns (x̂0 `[B, f, H, W, C]`, cache).

    One model call per loop iteration j < num_calls (the chunk's n steps), each writing this
    chunk's keys/values at `cache_frames` (the last write wins; reads only see the cached
    prefix, so earlier writes change nothing): x̂0 = x - t_j v, x <- (1 - t_{j+1}) x̂0 +
    t_{j+1} eps_{j+1}. Because the grid ends at 0 and is zero-padded, x after the loop is
    exactly x̂0 of the last step, and the cache holds the last step's keys (noisy context;
    a clean context overwrites them with `_rerun_fn`). The grid is a traced array, so
    schedules with the same step count share a compile.

    noise: `[S >= max_steps + 2, B, f, H, W, C]` from `chunk_noises` (0: initial, j: before step j);
    text_kv: the text's cross-attention keys/values (`WanModel.text_kv`, once per video);
    frame_pos: `[f]` int32 absolute positions; times: `[S]` float32 zero-padded grid.
    static = (sink_frames, evict_frames, cache_frames) of the buffer layout; cache_frames None
    means the traced int32 argument `cache_frames` is used instead (one compile for every
    cache length), and the window shift then moves the whole tail.
    layer_params: per-layer block parameters (`split_layer_params`).
    """
    sink, evict, _ = static
    cache = _shift_window(cache, sink * tpf, evict * tpf, _window_end(static, tpf, cache))
    kw = _call_kwargs(static, x_shape[1], cache_frames, actions, frame_pos, layer_params)

    def call(j, carry):
        x, cache = carry
        return _model_step(apply, params, x, cache, noise, text_kv, times, j, kw)

    return jax.lax.fori_loop(0, num_calls, call, (noise[0], cache))


def _rerun_fn(apply, params, cache, x0, text_kv, actions, frame_pos, cache_frames, layer_params, *, static: tuple):
    """The clean-context re-run of a chunk: v(x̂0, t = 0) writes the chunk's clean keys and
    values into the cache. Returns the cache only (the output is not needed, so XLA drops the
    last layer's work after its keys and values and the head). Arguments as in `_chunk_fn`;
    x0: `[B, f, H, W, C]`, the chunk's output."""
    kw = _call_kwargs(static, x0.shape[1], cache_frames, actions, frame_pos, layer_params)
    b, f = x0.shape[:2]
    _, cache = apply(params, x0, jnp.zeros((b, f), jnp.float32), text_kv, cache=cache, **kw)
    return cache


@functools.lru_cache(maxsize=16)
def _jitted_chunk(apply, compiler_options: tuple = ()):
    """One jitted chunk function per model `apply` and compiler options (shared by samplers);
    one compile per call count and static layout."""
    return jax.jit(
        functools.partial(_chunk_fn, apply),
        static_argnames=("num_calls", "static", "tpf", "x_shape"),
        donate_argnums=(1,),
        compiler_options=dict(compiler_options) or None,
    )


@functools.lru_cache(maxsize=16)
def _jitted_rerun(apply, compiler_options: tuple = ()):
    """The clean-context re-run (`_rerun_fn`) per model `apply` and compiler options; only the
    cache is donated (x̂0 is the chunk handed to the caller)."""
    return jax.jit(
        functools.partial(_rerun_fn, apply),
        static_argnames=("static",),
        donate_argnums=(1,),
        compiler_options=dict(compiler_options) or None,
    )


_jitted_new_cache = jax.jit(KVCache.create, static_argnums=(0, 1, 2, 3, 4))


@functools.lru_cache(maxsize=16)
def _jitted_text_kv(apply):
    """The text's cross-attention keys/values of every layer (`WanModel.text_kv`), jitted once per model."""
    return jax.jit(apply.text_kv)


@dataclasses.dataclass
class StreamingSampler:
    """Few-step chunk-wise generation with a KV cache.

    Args:
      apply, params: from `crm_jax.models.wan.functional(model)`.
      cfg: the model's WanConfig.
      pattern: block_causal AttentionPattern (block_frames=1: frame-wise; 3: chunk-wise;
        local_attn_blocks / sink_blocks: rolling cache for long or endless videos).
      latent_hw: (H, W) of the latents.
      batch: B.
      schedule: steps per chunk (int or per-chunk sequence, e.g. (4, 2)) or a TimeSchedule.
      context_mode: "clean" (re-run x̂0 at t = 0 to fill the cache, dispatched after the chunk
        is handed over) or "noisy" (the last denoising step writes the cache).
      max_cache_frames: largest KV buffer allowed, in frames (None: sized to each request).
        Requests it cannot hold without a rolling window raise ValueError.
      cache_dtype: KV dtype (default: the model's compute dtype).
      compiler_options: XLA options for the chunk function (`jax.jit(compiler_options=...)`),
        e.g. {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,...,WHILE,CONDITIONAL"}.
    """

    apply: Callable
    params: Any
    cfg: WanConfig
    pattern: AttentionPattern
    latent_hw: tuple[int, int]
    batch: int = 1
    schedule: Any = 4
    context_mode: str = "clean"
    max_cache_frames: int | None = None
    cache_dtype: Any = None
    compiler_options: dict | None = None

    def __post_init__(self):
        check_pattern(self.pattern)
        self.schedule = make_schedule(self.schedule)
        if self.context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {self.context_mode!r}")
        h, w = self.latent_hw
        _, ph, pw = self.cfg.patch_size
        if h % ph or w % pw or h <= 0 or w <= 0:
            raise ValueError(f"latent_hw {self.latent_hw} must be positive multiples of the patch {(ph, pw)}")
        if self.cfg.patch_size[0] != 1:
            raise ValueError("streaming assumes a temporal patch of 1")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.cfg.mean_flow:
            raise ValueError(
                "the streaming sampler calls models without MeanFlow's start time r; sample a "
                "MeanFlow student with crm_jax.sampling.causal.causal_sample(method='consistency'), "
                "which uses u(x, 0, t)"
            )
        if not hasattr(self.apply, "text_kv"):
            raise ValueError("apply must come from crm_jax.models.wan.functional (it needs apply.text_kv)")
        self.tpf = (h // ph) * (w // pw)
        self.layer_params = split_layer_params(self.params)
        dt = self.cfg.compute_dtype
        probe = jax.ShapeDtypeStruct((self.batch, self.tpf, self.cfg.num_heads, self.cfg.head_dim), dt)
        self.traced_cache_len = prefix_len_can_be_traced(
            probe, probe, impl=self.cfg.runtime.cache_impl, interpret=self.cfg.runtime.attn_interpret
        )
        options = tuple(sorted((self.compiler_options or {}).items()))
        self._jit = _jitted_chunk(self.apply, options)
        self._jit_rerun = _jitted_rerun(self.apply, options)

    # ------------------------------------------------------------------ helpers
    def frame_shape(self, frames: int) -> tuple[int, ...]:
        return (self.batch, frames, *self.latent_hw, self.cfg.in_channels)

    def check_context(self, context) -> jax.Array:
        context = jnp.asarray(context)
        want = (self.batch, self.cfg.text_len, self.cfg.text_dim)
        if context.ndim == 2 and tuple(context.shape) == want[1:]:
            context = jnp.broadcast_to(context, want)
        if tuple(context.shape) != want:
            raise ValueError(f"context must be [B, text_len, text_dim] = {want}, got {tuple(context.shape)}")
        return context

    def new_cache(self, frames: int) -> KVCache:
        """A zeroed KV cache for `frames` latent frames, made by one jitted call (2 x layers buffers
        made op by op cost ~0.4 ms of dispatch each: ~25 ms before the first chunk of wan_1_3b)."""
        return _jitted_new_cache(self.cfg, self.batch, frames, self.tpf, self.cache_dtype)

    def compiled_count(self) -> int:
        """Compiled chunk and re-run functions so far (shared by all samplers of this `apply`)."""
        return jit_cache_size(self._jit) + jit_cache_size(self._jit_rerun)

    def text_kv_of(self, context):
        """The text's cross-attention keys/values of every layer for `context` (jitted)."""
        return _jitted_text_kv(self.apply)(self.params, context)

    def chunk_call(self, cache, key, text_kv, actions, lay: ChunkLayout, rerun: bool = True):
        """Run one chunk (jitted). Returns (x0 `[B, f, H, W, C]`, new cache).

        text_kv: `text_kv_of(context)` (computed once per video).
        rerun: with a clean context, also dispatch the re-run (`rerun_call`) after the denoising
        calls; False leaves the cache with the last step's keys."""
        times, n = padded_times(self.schedule, lay.index)
        acts, frame_pos, static, cache_frames = self._layout_args(actions, lay)
        x_shape = self.frame_shape(lay.frames)
        noise = chunk_noises(key, jnp.int32(lay.index), x_shape, noise_count(self.schedule))
        x, cache = self._jit(
            self.params,
            cache,
            noise,
            text_kv,
            acts,
            frame_pos,
            jnp.asarray(times),
            cache_frames,
            self.layer_params,
            num_calls=int(n),
            static=static,
            tpf=self.tpf,
            x_shape=x_shape,
        )
        if self.context_mode == "clean" and rerun:  # x is x̂0 exactly: the grid ends at t_n = 0
            cache = self.rerun_call(cache, x, text_kv, actions, lay)
        return x, cache

    def _layout_args(self, actions, lay: ChunkLayout):
        """The per-chunk call arguments shared by `chunk_call` and `rerun_call`: the actions as an
        array (or None), the frames' absolute positions `[f]`, the static cache layout
        (sink, evicted, valid frames or None when traced) and the traced valid-frame count (or None)."""
        acts = None if actions is None else jnp.asarray(actions)
        frame_pos = jnp.arange(lay.start, lay.end, dtype=jnp.int32)
        traced = self.traced_cache_len
        static = (lay.sink_frames, lay.evict_frames, None if traced else lay.cache_frames)
        cache_frames = jnp.int32(lay.cache_frames) if traced else None
        return acts, frame_pos, static, cache_frames

    def rerun_call(self, cache, x0, text_kv, actions, lay: ChunkLayout):
        """The clean-context re-run of chunk `lay` (jitted, cache donated): v(x̂0, t = 0) writes the
        chunk's clean keys/values. x0: the chunk's output `[B, f, H, W, C]`. Returns the new cache."""
        acts, frame_pos, static, cache_frames = self._layout_args(actions, lay)
        return self._jit_rerun(
            self.params, cache, x0, text_kv, acts, frame_pos, cache_frames, self.layer_params, static=static
        )

    # ------------------------------------------------------------------ API
    def stream(
        self, key: jax.Array, context, num_frames: int | None, actions=None, prefetch: bool | None = None
    ) -> Iterator[Chunk]:
        """Yield chunks as they are generated.

        Args:
          key: PRNG key (all noise derives from it via `chunk_noise`).
          context: `[B, text_len, text_dim]` (or `[text_len, text_dim]`, broadcast).
          num_frames: latent frames to generate; None = endless (needs a rolling window).
          actions: None, `[T]`/`[B, T]` ids, a callback `fn(chunk, start, frames)` or an
            iterator of per-chunk ids (see `ActionSource`); ids are checked against the vocabulary.
          prefetch: dispatch chunk i+1 before yielding chunk i (so the caller can encode
            while it computes). Default: on unless actions are live (callback/iterator).
        """
        capacity = check_length(self.pattern, num_frames, self.max_cache_frames)
        context = self.check_context(context)
        src = ActionSource(actions, self.batch, self.cfg.num_actions)
        src.check_length(num_frames)
        prefetch = (not src.live) if prefetch is None else prefetch
        return self._run(key, context, num_frames, src, capacity, prefetch)  # checked eagerly above

    def _run(self, key, context, num_frames, src: ActionSource, capacity: int, prefetch: bool):
        layout = CacheLayout(self.pattern, capacity)
        cache = self.new_cache(capacity)
        text_kv = self.text_kv_of(context)
        pending = None
        for i, (s, e) in enumerate(chunk_bounds(self.pattern, num_frames)):
            lay = layout.next(s, e)
            acts = src.get(i, s, e)
            last = num_frames is not None and e >= num_frames  # its cache is never read
            x0, cache = self.chunk_call(cache, key, text_kv, acts, lay, rerun=not last)
            self.cache, self.layout = cache, lay  # for inspection (donated by the next chunk)
            chunk = Chunk(i, s, x0, acts)
            if not prefetch:
                yield chunk
                continue
            if pending is not None:
                yield pending
            pending = chunk
        if pending is not None:
            yield pending
        self.cache = None

    def generate(self, key: jax.Array, context, num_frames: int, actions=None) -> jax.Array:
        """The whole video `[B, num_frames, H, W, C]` float32."""
        if num_frames is None:
            raise ValueError("generate needs a finite num_frames (use stream() for endless videos)")
        return jnp.concatenate([c.frames for c in self.stream(key, context, num_frames, actions)], axis=1)


def stream(
    apply,
    params,
    cfg: WanConfig,
    key,
    context,
    num_frames,
    *,
    pattern,
    latent_hw,
    steps=4,
    context_mode="clean",
    actions=None,
    max_cache_frames=None,
) -> Iterator[Chunk]:
    """Functional shortcut: `StreamingSampler(...).stream(key, context, num_frames, actions)`."""
    batch = int(np.shape(context)[0]) if np.ndim(context) == 3 else 1
    s = StreamingSampler(apply, params, cfg, pattern, tuple(latent_hw), batch, steps, context_mode, max_cache_frames)
    return s.stream(key, context, num_frames, actions)


def generate(apply, params, cfg: WanConfig, key, context, num_frames, **kw) -> jax.Array:
    """Functional shortcut for the whole video `[B, T, H, W, C]`."""
    return jnp.concatenate([c.frames for c in stream(apply, params, cfg, key, context, num_frames, **kw)], 1)
