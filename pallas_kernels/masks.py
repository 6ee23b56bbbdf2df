"""Attention patterns over frame-structured token sequences.

One `MaskSpec` drives the dense oracle (`dense_mask`), the element-wise mask
evaluated inside kernels (`allowed`) and the block-sparse tile schedules the
kernels iterate over (`tile_schedule`: per-row tile lists, for the GPU kernels;
`tile_runs`: per-row runs of consecutive tiles, whose size grows with the number of
rows only, for the TPU kernels' scalar memory).

Token layout. A video of `F` frames with `tokens_per_frame` tokens each is a
sequence of `F * tokens_per_frame` tokens, frame-major. Frames are grouped into
attention blocks: the first block holds `first_block_frames` frames, every
later block `block_frames` frames (`[first][chunk][chunk]...`). The block id of
the token at position `p` is therefore

    frame = p // tokens_per_frame
    block = 0                                   if frame < first_block_frames
            1 + (frame - first_block_frames) // block_frames   otherwise

Kinds:
  * ``full``: every query sees every key (bidirectional teacher; cross-attention
    with `q_len != kv_len`).
  * ``block_causal``: a query in block `b` sees key blocks `<= b`. Queries may
    start later than keys (`q_offset` tokens, for a KV-cache prefix); an optional
    sliding window keeps only the last `local_attn_blocks` blocks, plus the first
    `sink_blocks` blocks.
  * ``teacher_forcing``: the sequence is packed `[clean | noisy]`, each half of
    `L = q_len // 2` tokens. Clean query in block `i` -> clean blocks `<= i`.
    Noisy query in block `i` -> clean blocks `< i` and its own noisy block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("full", "block_causal", "teacher_forcing")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A static (hashable) description of an attention pattern.

    Attributes:
      kind: one of ``full``, ``block_causal``, ``teacher_forcing``.
      q_len: number of query tokens.
      kv_len: number of key/value tokens.
      tokens_per_frame: tokens per latent frame (1560 for Wan at 480p).
      first_block_frames: frames in the first attention block.
      block_frames: frames in every later block (the chunk size).
      q_offset: position of query 0 within the key sequence (block_causal only).
      local_attn_blocks: if > 0, a query sees only the last this-many blocks
        (its own included), plus the sink blocks.
      sink_blocks: blocks at the start that stay visible under a local window.
    """

    kind: str
    q_len: int
    kv_len: int
    tokens_per_frame: int = 1
    first_block_frames: int = 1
    block_frames: int = 1
    q_offset: int = 0
    local_attn_blocks: int = 0
    sink_blocks: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"MaskSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("q_len", "kv_len", "tokens_per_frame", "first_block_frames", "block_frames"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MaskSpec.{name} must be positive, got {getattr(self, name)}")
        for name in ("q_offset", "local_attn_blocks", "sink_blocks"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"MaskSpec.{name} must be >= 0, got {getattr(self, name)}")
        if self.kind == "teacher_forcing":
            if self.q_len != self.kv_len or self.q_len % 2:
                raise ValueError(
                    "teacher_forcing packs [clean | noisy]: q_len must equal kv_len and be even, "
                    f"got q_len={self.q_len}, kv_len={self.kv_len}"
                )
            if (self.q_len // 2) % self.tokens_per_frame:
                raise ValueError(
                    f"teacher_forcing half length {self.q_len // 2} is not a multiple of "
                    f"tokens_per_frame={self.tokens_per_frame}"
                )
            if self.q_offset:
                raise ValueError("teacher_forcing does not take a q_offset")
        if self.kind == "block_causal":
            if self.q_offset + self.q_len > self.kv_len:
                raise ValueError(
                    f"block_causal queries [{self.q_offset}, {self.q_offset + self.q_len}) extend "
                    f"past the {self.kv_len} keys"
                )
        if self.kind == "full" and (self.q_offset or self.local_attn_blocks or self.sink_blocks):
            raise ValueError("full attention takes no q_offset, local window or sinks")

    # ----------------------------------------------------------------- helpers
    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise a ValueError if the spec does not match the given lengths."""
        if (q_len, kv_len) != (self.q_len, self.kv_len):
            raise ValueError(
                f"MaskSpec({self.kind}) expects q_len={self.q_len}, kv_len={self.kv_len}; "
                f"got q_len={q_len}, kv_len={kv_len}"
            )

    def replace(self, **kw) -> MaskSpec:
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------- constructors
def full(q_len: int, kv_len: int | None = None) -> MaskSpec:
    return MaskSpec("full", q_len, q_len if kv_len is None else kv_len)


def block_causal(
    num_frames: int,
    tokens_per_frame: int,
    block_frames: int,
    first_block_frames: int | None = None,
    *,
    q_frames: int | None = None,
    local_attn_blocks: int = 0,
    sink_blocks: int = 0,
) -> MaskSpec:
    """Block-causal mask over `num_frames` key frames.

    With `q_frames` set, the queries are the last `q_frames` frames (KV-cache use).
    """
    first = block_frames if first_block_frames is None else first_block_frames
    kv_len = num_frames * tokens_per_frame
    q_len = kv_len if q_frames is None else q_frames * tokens_per_frame
    return MaskSpec(
        "block_causal",
        q_len,
        kv_len,
        tokens_per_frame,
        first,
        block_frames,
        q_offset=kv_len - q_len,
        local_attn_blocks=local_attn_blocks,
        sink_blocks=sink_blocks,
    )


def teacher_forcing(
    num_frames: int,
    tokens_per_frame: int,
    block_frames: int,
    first_block_frames: int | None = None,
    *,
    local_attn_blocks: int = 0,
    sink_blocks: int = 0,
) -> MaskSpec:
    """Teacher-forcing mask over a packed `[clean | noisy]` sequence of 2 x num_frames frames."""
    first = block_frames if first_block_frames is None else first_block_frames
    n = 2 * num_frames * tokens_per_frame
    return MaskSpec(
        "teacher_forcing",
        n,
        n,
        tokens_per_frame,
        first,
        block_frames,
        local_attn_blocks=local_attn_blocks,
        sink_blocks=sink_blocks,
    )


# ---------------------------------------------------------------- element-wise
def block_of(spec: MaskSpec, pos):
    """Block id of token position(s) `pos` (numpy or jax integer arrays)."""
    frame = pos // spec.tokens_per_frame
    later = (frame - spec.first_block_frames) // spec.block_frames + 1
    return later * (frame >= spec.first_block_frames)


def _window(spec: MaskSpec, qb, kb):
    if spec.local_attn_blocks <= 0:
        return True
    return (kb > qb - spec.local_attn_blocks) | (kb < spec.sink_blocks)


def allowed(spec: MaskSpec, q_pos, k_pos, xp: Any = np):
    """Element-wise mask: may query `q_pos` attend to key `k_pos`?

    `q_pos` and `k_pos` are broadcastable integer arrays of positions in the
    query and key sequences (0-based, without `q_offset`). Positions past
    `q_len` / `kv_len` (tile padding) are never allowed. Works with numpy or
    jax.numpy (pass `xp=jnp`), including inside Pallas kernels.
    """
    in_range = (q_pos < spec.q_len) & (k_pos < spec.kv_len)
    if spec.kind == "full":
        return in_range
    if spec.kind == "block_causal":
        qb = block_of(spec, q_pos + spec.q_offset)
        kb = block_of(spec, k_pos)
        return in_range & (kb <= qb) & _window(spec, qb, kb)
    half = spec.q_len // 2
    q_noisy = q_pos >= half
    k_noisy = k_pos >= half
    qb = block_of(spec, xp.where(q_noisy, q_pos - half, q_pos))
    kb = block_of(spec, xp.where(k_noisy, k_pos - half, k_pos))
    clean_q = (~k_noisy) & (kb <= qb)
    noisy_q = ((~k_noisy) & (kb < qb)) | (k_noisy & (kb == qb))
    return in_range & xp.where(q_noisy, noisy_q, clean_q) & _window(spec, qb, kb)


def dense_mask(spec: MaskSpec) -> np.ndarray:
    """The full `[q_len, kv_len]` boolean mask (the oracle; small sizes only)."""
    q = np.arange(spec.q_len)[:, None]
    k = np.arange(spec.kv_len)[None, :]
    return np.broadcast_to(allowed(spec, q, k), (spec.q_len, spec.kv_len)).copy()


# ---------------------------------------------------------------- tile schedules
def _segments(spec: MaskSpec, length: int, side: str):
    """Split [0, length) into runs of constant mask behaviour; return run starts."""
    pos = np.arange(length)
    if spec.kind == "full":
        return np.array([0])
    if spec.kind == "block_causal":
        key = block_of(spec, pos + (spec.q_offset if side == "q" else 0))
    else:
        half = spec.q_len // 2
        noisy = pos >= half
        key = block_of(spec, np.where(noisy, pos - half, pos)) + noisy * (10**9)
    change = np.concatenate([[True], key[1:] != key[:-1]])
    return np.flatnonzero(change)


def tile_classes(spec: MaskSpec, block_q: int, block_k: int) -> np.ndarray:
    """Classify each (query tile, key tile) pair: 0 empty, 1 full, 2 partial.

    Returns an int8 array `[ceil(q_len / block_q), ceil(kv_len / block_k)]`.
    A tile is *full* when every one of its query/key pairs is allowed (and none
    is padding), *empty* when none is, *partial* otherwise. Computed exactly from
    the runs of constant mask behaviour, without building the dense mask.
    """
    nq = -(-spec.q_len // block_q)
    nk = -(-spec.kv_len // block_k)
    qs = _segments(spec, spec.q_len, "q")
    ks = _segments(spec, spec.kv_len, "k")
    # Segment-level mask, evaluated at each run's first element.
    seg = np.asarray(allowed(spec, qs[:, None], ks[None, :])).astype(np.int64)
    # 2-D prefix sums for O(1) any/all over a rectangle of runs.
    ps = np.zeros((len(qs) + 1, len(ks) + 1), np.int64)
    ps[1:, 1:] = seg.cumsum(0).cumsum(1)
    q0 = np.arange(nq) * block_q
    q1 = np.minimum(q0 + block_q, spec.q_len) - 1
    k0 = np.arange(nk) * block_k
    k1 = np.minimum(k0 + block_k, spec.kv_len) - 1
    a = np.searchsorted(qs, q0, side="right") - 1
    b = np.searchsorted(qs, q1, side="right")
    c = np.searchsorted(ks, k0, side="right") - 1
    d = np.searchsorted(ks, k1, side="right")
    A, B = a[:, None], b[:, None]
    C, D = c[None, :], d[None, :]
    total = ps[B, D] - ps[A, D] - ps[B, C] + ps[A, C]
    count = (B - A) * (D - C)
    padded = ((q1 - q0 + 1) < block_q)[:, None] | ((k1 - k0 + 1) < block_k)[None, :]
    out = np.where(total == 0, 0, np.where((total == count) & ~padded, 1, 2))
    return out.astype(np.int8)


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """Per-row lists of column tiles to visit, full tiles and partial tiles apart.

    For the forward/JVP pass rows are query tiles and columns key tiles; for the
    dK/dV backward pass (``transpose=True``) rows are key tiles and columns query
    tiles. Lists are padded with the row's last valid entry (or 0) so kernels can
    read them unconditionally; `*_count` says how many entries are real.

      full_idx  [rows, max_full]   int32
      full_count [rows]            int32
      part_idx  [rows, max_part]   int32
      part_count [rows]            int32
    """

    full_idx: np.ndarray
    full_count: np.ndarray
    part_idx: np.ndarray
    part_count: np.ndarray

    @property
    def visited_pairs(self) -> int:
        return int(self.full_count.sum() + self.part_count.sum())


def _pack(mask: np.ndarray):
    rows = mask.shape[0]
    counts = mask.sum(1).astype(np.int32)
    width = max(int(counts.max(initial=0)), 1)
    idx = np.zeros((rows, width), np.int32)
    for r in range(rows):
        cols = np.flatnonzero(mask[r])
        if len(cols):
            idx[r, : len(cols)] = cols
            idx[r, len(cols) :] = cols[-1]
    return idx, counts


def tile_schedule(spec: MaskSpec, block_q: int, block_k: int, transpose: bool = False) -> TileSchedule:
    """Block-sparse schedule of `spec` at tile sizes (block_q, block_k)."""
    cls = tile_classes(spec, block_q, block_k)
    if transpose:
        cls = cls.T
    full_idx, full_count = _pack(cls == 1)
    part_idx, part_count = _pack(cls == 2)
    return TileSchedule(full_idx, full_count, part_idx, part_count)


def allowed_pairs(spec: MaskSpec) -> int:
    """Number of allowed (query, key) pairs, for useful-FLOP counts. Exact, no dense mask."""
    qs = _segments(spec, spec.q_len, "q")
    ks = _segments(spec, spec.kv_len, "k")
    ql = np.diff(np.append(qs, spec.q_len))
    kl = np.diff(np.append(ks, spec.kv_len))
    seg = np.asarray(allowed(spec, qs[:, None], ks[None, :]))
    return int((ql[:, None] * kl[None, :] * seg).sum())


@dataclasses.dataclass(frozen=True)
class TileRuns:
    """Per-row runs of consecutive column tiles of one class (all full or all partial).

    The compressed form of `TileSchedule` that the TPU kernels read from scalar memory:
    its size is `rows x max_runs`, independent of how many tiles a row visits (a row of a
    block-causal or teacher-forcing mask visits its tiles in a few runs). Step `j` of row
    `r` visits run `k` where `end[r, k-1] <= j < end[r, k]` (`end[r, -1]` = 0), column tile
    `start[r, k] + j - end[r, k-1]`. Padding runs have zero length (`end` repeats the row's
    total). Rows are query tiles (key tiles with ``transpose=True``), as in `TileSchedule`.

      start  [rows, max_runs] int32   first column tile of each run
      end    [rows, max_runs] int32   steps of the row up to the run's end (cumulative)
      masked [rows, max_runs] int32   1 where the run's tiles need the element-wise mask
    """

    start: np.ndarray
    end: np.ndarray
    masked: np.ndarray

    @property
    def steps(self) -> int:
        """Steps of the longest row (>= 1): the grid's inner extent."""
        return max(1, int(self.end[:, -1].max(initial=0)))

    @property
    def visited_pairs(self) -> int:
        return int(self.end[:, -1].sum())

    def packed(self) -> tuple[np.ndarray, np.ndarray, int]:
        """What the kernels read as scalars: `(start, end, max_runs)`, with `start`
        `[rows * max_runs]` int32 = 2 * first column tile + masked and `end` `[rows * max_runs]`
        int32 the cumulative steps, both flattened row-major."""
        start = (2 * self.start + self.masked).reshape(-1).astype(np.int32)
        return start, self.end.reshape(-1).astype(np.int32), int(self.start.shape[1])


def tile_runs(spec: MaskSpec, block_q: int, block_k: int, transpose: bool = False, rows: int | None = None) -> TileRuns:
    """`tile_schedule` as runs of consecutive tiles of one class (see `TileRuns`).

    `rows` pads the row count (extra rows visit nothing), e.g. to the kernel grid's rows.
    """
    cls = tile_classes(spec, block_q, block_k)
    if transpose:
        cls = cls.T
    n_rows = cls.shape[0] if rows is None else rows
    if n_rows < cls.shape[0]:
        raise ValueError(f"tile_runs: {cls.shape[0]} tile rows do not fit in rows={n_rows}")
    # A run starts wherever a visited tile's class differs from its left neighbour's.
    left = np.concatenate([np.zeros((cls.shape[0], 1), cls.dtype), cls[:, :-1]], axis=1)
    starts = (cls != 0) & (cls != left)
    per_row = starts.sum(1)
    width = max(1, int(per_row.max(initial=0)))
    start = np.zeros((n_rows, width), np.int32)
    end = np.zeros((n_rows, width), np.int32)
    masked = np.zeros((n_rows, width), np.int32)
    for r in range(cls.shape[0]):
        cols = np.flatnonzero(starts[r])
        if not len(cols):
            continue
        visited = cls[r] != 0
        # A run ends at the next run's start or at the first unvisited tile after it.
        lengths = np.array(
            [np.argmin(np.append(visited[c:], False) & np.append((cls[r, c:] == cls[r, c]), False)) for c in cols]
        )
        k = len(cols)
        start[r, :k] = cols
        end[r, :k] = np.cumsum(lengths)
        end[r, k:] = end[r, k - 1]
        masked[r, :k] = cls[r, cols] == 2
    return TileRuns(start, end, masked)
