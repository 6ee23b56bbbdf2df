"""Static plans for streaming: chunk boundaries, per-chunk time grids, KV-cache layout.

Everything here is plain Python/numpy (no JAX): it decides the static shapes and
offsets each jitted chunk call is compiled for.

Chunks follow the attention blocks of an `AttentionPattern` (`block_causal`):
chunk 0 has `pattern.first` frames, every later chunk `pattern.block_frames`
(the last chunk of a finite video may be shorter).

KV-cache layout (`CacheLayout`), in frames, inside a buffer of `capacity` frames:

    [ sink blocks | window blocks (oldest first) | free ]

* Without a local window (`pattern.local_attn_blocks == 0`) every block is kept:
  the buffer must hold the whole video (`capacity >= num_frames`, else ValueError).
* With a window of `L = local_attn_blocks` blocks (the query's own block included)
  and `S = sink_blocks` sinks, a chunk sees the S sink blocks plus the last L - 1
  blocks before it -- exactly the `block_causal` mask with that window. Before a
  chunk is computed, the oldest non-sink block is evicted whenever the window part
  holds L - 1 blocks already, by shifting the window part left (contiguous buffer).
  The capacity is then bounded: `sink frames + L * (largest non-sink block)`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator

import numpy as np

from crm_jax.diffusion import few_step_times
from crm_jax.models.wan import AttentionPattern

CONTEXT_MODES = ("clean", "noisy")


def check_pattern(pattern: AttentionPattern) -> AttentionPattern:
    """Streaming needs a block-causal pattern (chunks = attention blocks)."""
    if not isinstance(pattern, AttentionPattern):
        raise ValueError(f"pattern must be an AttentionPattern, got {type(pattern).__name__}")
    if pattern.kind != "block_causal":
        raise ValueError(f"streaming needs a block_causal AttentionPattern, got kind={pattern.kind!r}")
    if pattern.sink_blocks and not pattern.local_attn_blocks:
        raise ValueError("sink_blocks only make sense with a local window (local_attn_blocks > 0)")
    return pattern


def chunk_bounds(pattern: AttentionPattern, num_frames: int | None) -> Iterator[tuple[int, int]]:
    """Yield (start, end) frame indices of each chunk; endless when num_frames is None."""
    s, size = 0, pattern.first
    while num_frames is None or s < num_frames:
        e = s + size if num_frames is None else min(s + size, num_frames)
        yield s, e
        s, size = e, pattern.block_frames


# ----------------------------------------------------------------------------- time grids


def _as_grid(g, where: str) -> np.ndarray:
    g = np.asarray(g, np.float64).reshape(-1)
    if g.size == 0:
        raise ValueError(f"{where}: empty time grid")
    if g[-1] != 0.0:
        g = np.append(g, 0.0)  # the final 0 may be left out
    if g.size < 2 or np.any(np.diff(g) >= 0) or g[0] > 1.0 or g[-1] < 0.0 or np.isnan(g).any():
        raise ValueError(
            f"{where}: a time grid must be strictly decreasing RF times in (0, 1] ending at 0, got {g.tolist()}"
        )
    return g


@dataclasses.dataclass(frozen=True)
class TimeSchedule:
    """Per-chunk few-step grids.

    `steps`: an int (every chunk) or a sequence (chunk i uses `steps[min(i, len-1)]`,
    e.g. (4, 2) = 4 steps on the first chunk, 2 after); grids are `few_step_times(n,
    sigma_max)` = [σmax/(σmax+1), 15/16, 5/6, 5/8][:n] + [0].
    `grids`: explicit grids instead (same indexing rule), each a strictly decreasing
    sequence of RF times ending at 0 (the 0 may be omitted): n steps = n + 1 values.
    """

    steps: int | tuple[int, ...] = 4
    grids: tuple[tuple[float, ...], ...] | None = None
    sigma_max: float = 1600.0

    def __post_init__(self):
        if self.grids is not None:
            grids = tuple(tuple(_as_grid(g, f"time grid {i}").tolist()) for i, g in enumerate(self.grids))
            if not grids:
                raise ValueError("grids must hold at least one grid")
            object.__setattr__(self, "grids", grids)
        else:
            steps = (self.steps,) if np.ndim(self.steps) == 0 else tuple(self.steps)
            if not steps or any(int(n) != n or n < 1 for n in steps):
                raise ValueError(f"steps must be positive ints, got {self.steps!r}")
            grids = tuple(tuple(few_step_times(int(n), self.sigma_max).tolist()) for n in steps)
            object.__setattr__(self, "steps", tuple(int(n) for n in steps))
            object.__setattr__(self, "grids", grids)

    def grid(self, chunk: int) -> np.ndarray:
        """RF times `[n + 1]` (float64) of chunk `chunk`, ending at 0."""
        return np.asarray(self.grids[min(chunk, len(self.grids) - 1)])

    def num_steps(self, chunk: int) -> int:
        return len(self.grid(chunk)) - 1

    @property
    def max_steps(self) -> int:
        return max(len(g) - 1 for g in self.grids)


def make_schedule(steps=4, grids=None, sigma_max: float = 1600.0) -> TimeSchedule:
    if isinstance(steps, TimeSchedule):
        return steps
    return TimeSchedule(steps=steps, grids=None if grids is None else tuple(map(tuple, grids)), sigma_max=sigma_max)


# ----------------------------------------------------------------------------- cache layout


def sink_frames(pattern: AttentionPattern) -> int:
    """Frames in the sink blocks."""
    s = pattern.sink_blocks
    return 0 if s == 0 else pattern.first + (s - 1) * pattern.block_frames


def cache_capacity(pattern: AttentionPattern, num_frames: int | None) -> int:
    """Frames of KV buffer needed to stream `num_frames` frames (None = endless).

    Without a local window the whole video must fit: returns `num_frames`
    (ValueError when endless). With a window the result is independent of length.
    """
    check_pattern(pattern)
    if not pattern.local_attn_blocks:
        if num_frames is None:
            raise ValueError(
                "an endless stream needs a rolling KV cache: set local_attn_blocks (and sink_blocks) "
                "in the AttentionPattern"
            )
        return num_frames
    non_sink = [pattern.block_frames] + ([pattern.first] if pattern.sink_blocks == 0 else [])
    cap = sink_frames(pattern) + pattern.local_attn_blocks * max(non_sink)
    return cap if num_frames is None else min(cap, num_frames)


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Static facts of one chunk call.

    evict_frames: frames removed from the front of the window part before the call
      (the window part then starts at `sink_frames`).
    cache_frames: valid frames in the buffer after eviction (all attended to);
      the chunk's keys/values are written right after them.
    """

    index: int
    start: int
    end: int
    sink_frames: int
    evict_frames: int
    cache_frames: int

    @property
    def frames(self) -> int:
        return self.end - self.start


class CacheLayout:
    """Tracks which blocks sit in the KV buffer (see the module docstring)."""

    def __init__(self, pattern: AttentionPattern, capacity: int):
        self.pattern = check_pattern(pattern)
        self.capacity = int(capacity)
        self.sinks: list[int] = []  # sizes of sink blocks in the buffer
        self.window: deque[int] = deque()  # sizes of window blocks, oldest first
        self.index = 0

    @property
    def sink_total(self) -> int:
        return sum(self.sinks)

    @property
    def filled(self) -> int:
        return self.sink_total + sum(self.window)

    def next(self, start: int, end: int) -> ChunkLayout:
        """Plan the chunk [start, end) and record it as written."""
        p, size = self.pattern, end - start
        evict = 0
        if p.local_attn_blocks:
            while len(self.window) > p.local_attn_blocks - 1:
                evict += self.window.popleft()
        cache_frames = self.filled
        if cache_frames + size > self.capacity:
            raise ValueError(
                f"KV cache of {self.capacity} frames cannot hold {cache_frames} cached + {size} new frames "
                f"(chunk {self.index}, frames {start}..{end - 1}); use a rolling window "
                f"(AttentionPattern.local_attn_blocks / sink_blocks) or a larger cache"
            )
        lay = ChunkLayout(self.index, start, end, self.sink_total, evict, cache_frames)
        if self.index < p.sink_blocks:
            self.sinks.append(size)
        else:
            self.window.append(size)
        self.index += 1
        return lay


def check_length(pattern: AttentionPattern, num_frames: int | None, max_cache_frames: int | None) -> int:
    """Buffer frames for a request, or ValueError when the cache cannot hold it."""
    if num_frames is not None and (int(num_frames) != num_frames or num_frames < 1):
        raise ValueError(f"num_frames must be a positive int or None (endless), got {num_frames!r}")
    need = cache_capacity(pattern, num_frames)
    if max_cache_frames is not None and need > max_cache_frames:
        what = "an endless stream" if num_frames is None else f"{num_frames} frames"
        hint = (
            "set local_attn_blocks (and sink_blocks) in the AttentionPattern for a rolling window"
            if not pattern.local_attn_blocks
            else "use a smaller local window"
        )
        raise ValueError(f"the KV cache holds at most {max_cache_frames} frames but {what} need {need}: {hint}")
    return need
