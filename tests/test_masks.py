"""MaskSpec: dense oracle semantics and exactness of the tile classification."""

import numpy as np
import pytest

from pallas_kernels import masks


def _block_ids(frames, first, chunk):
    out, b = [], 0
    sizes = [first] + [chunk] * frames
    for b, size in enumerate(sizes):
        out += [b] * size
        if len(out) >= frames:
            break
    return np.array(out[:frames])


def test_block_causal_semantics_against_direct_definition():
    tpf, frames, first, chunk = 3, 7, 1, 3
    spec = masks.block_causal(frames, tpf, chunk, first)
    blocks = np.repeat(_block_ids(frames, first, chunk), tpf)
    expect = blocks[None, :] <= blocks[:, None]
    np.testing.assert_array_equal(masks.dense_mask(spec), expect)


def test_teacher_forcing_semantics_against_direct_definition():
    tpf, frames, chunk = 2, 6, 2
    spec = masks.teacher_forcing(frames, tpf, chunk)
    b = np.repeat(_block_ids(frames, chunk, chunk), tpf)
    n = len(b)
    m = np.zeros((2 * n, 2 * n), bool)
    m[:n, :n] = b[None, :] <= b[:, None]  # clean -> clean prefix
    m[n:, :n] = b[None, :] < b[:, None]  # noisy -> strictly earlier clean
    m[n:, n:] = b[None, :] == b[:, None]  # noisy -> own noisy block
    np.testing.assert_array_equal(masks.dense_mask(spec), m)


def test_q_offset_equals_slice_of_full_mask():
    full = masks.block_causal(9, 4, 3, 1)
    tail = masks.block_causal(9, 4, 3, 1, q_frames=3)
    np.testing.assert_array_equal(masks.dense_mask(tail), masks.dense_mask(full)[-12:])


def test_local_window_and_sinks():
    spec = masks.block_causal(8, 1, 1, local_attn_blocks=2, sink_blocks=1)
    m = masks.dense_mask(spec)
    assert m[5].tolist() == [True, False, False, False, True, True, False, False]


SPECS = [
    masks.full(37, 53),
    masks.block_causal(7, 13, 3, 1),
    masks.block_causal(5, 10, 1),
    masks.block_causal(9, 7, 2, 3, q_frames=2),
    masks.block_causal(12, 5, 1, local_attn_blocks=3, sink_blocks=1),
    masks.teacher_forcing(6, 11, 3),
    masks.teacher_forcing(5, 9, 1),
    masks.teacher_forcing(7, 6, 2, 1),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
@pytest.mark.parametrize("bq,bk", [(16, 16), (8, 32), (32, 8)])
def test_tile_classes_are_exact(spec, bq, bk):
    dense = masks.dense_mask(spec)
    cls = masks.tile_classes(spec, bq, bk)
    for i in range(cls.shape[0]):
        for j in range(cls.shape[1]):
            t = np.zeros((bq, bk), bool)
            sub = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            t[: sub.shape[0], : sub.shape[1]] = sub
            want = 0 if not t.any() else (1 if t.all() else 2)
            assert cls[i, j] == want, (i, j)
    assert masks.allowed_pairs(spec) == dense.sum()


def test_schedule_lists_cover_exactly_the_nonempty_tiles():
    spec = masks.teacher_forcing(6, 11, 3)
    cls = masks.tile_classes(spec, 16, 16)
    for transpose in (False, True):
        s = masks.tile_schedule(spec, 16, 16, transpose=transpose)
        c = cls.T if transpose else cls
        for r in range(c.shape[0]):
            assert sorted(s.full_idx[r, : s.full_count[r]]) == list(np.flatnonzero(c[r] == 1))
            assert sorted(s.part_idx[r, : s.part_count[r]]) == list(np.flatnonzero(c[r] == 2))


@pytest.mark.parametrize(
    "spec",
    SPECS
    + [
        masks.teacher_forcing(21, 1560, 1),
        masks.teacher_forcing(21, 1560, 3, local_attn_blocks=3, sink_blocks=1),
        masks.block_causal(21, 1560, 3, q_frames=3),
    ],
    ids=lambda s: f"{s.kind}-{s.q_len}",
)
@pytest.mark.parametrize("transpose", [False, True])
def test_tile_runs_visit_exactly_the_schedule(spec, transpose):
    """Expanding the runs gives each row's full and partial tiles, each once, masked where partial."""
    bq, bk = (16, 8) if spec.q_len < 10_000 else (512, 256)
    s = masks.tile_schedule(spec, bq, bk, transpose=transpose)
    r = masks.tile_runs(spec, bq, bk, transpose=transpose, rows=s.full_count.shape[0] + 2)
    assert r.start.shape[0] == s.full_count.shape[0] + 2 and not r.end[-2:].any()  # padding rows: nothing
    for row in range(s.full_count.shape[0]):
        cols, masked, prev = [], [], 0
        for k in range(r.start.shape[1]):
            n = int(r.end[row, k]) - prev
            assert n >= 0
            cols += list(range(r.start[row, k], r.start[row, k] + n))
            masked += [bool(r.masked[row, k])] * n
            prev = int(r.end[row, k])
        assert sorted(c for c, m in zip(cols, masked) if not m) == sorted(s.full_idx[row, : s.full_count[row]])
        assert sorted(c for c, m in zip(cols, masked) if m) == sorted(s.part_idx[row, : s.part_count[row]])
        assert len(cols) == len(set(cols))
    assert r.visited_pairs == s.visited_pairs
    assert r.steps == max(1, int((s.full_count + s.part_count).max()))


def test_tile_runs_stay_small_where_tile_lists_do_not():
    """The TPU kernels' scalar memory holds the runs: a few per row, at any sequence length."""
    spec = masks.teacher_forcing(42, 1560, 1)  # 131,040 tokens
    r = masks.tile_runs(spec, 128, 128, transpose=True)
    assert r.start.shape[1] <= 6
    runs_bytes = 2 * r.start.size * 4
    lists_bytes = 2 * r.start.shape[0] * r.steps * 4  # a per-step (tile, kind) list
    assert runs_bytes < 100 * 2**10 < 2**20 < lists_bytes


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(kind="nope", q_len=4, kv_len=4), "kind"),
        (dict(kind="teacher_forcing", q_len=5, kv_len=5), "even"),
        (dict(kind="block_causal", q_len=8, kv_len=4), "extend past"),
        (dict(kind="full", q_len=0, kv_len=4), "positive"),
    ],
)
def test_bad_specs_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        masks.MaskSpec(**kw)


def test_unmasked_specs_route_to_dense_attention():
    """`ops.unmasked`: which specs `impl="auto"` may hand to cuDNN on a GPU (all pairs allowed)."""
    from pallas_kernels.ops import unmasked

    assert unmasked(masks.full(12, 5))
    # the last block of a KV-cache call sees the whole buffer and itself
    assert unmasked(masks.block_causal(9, 4, 3, q_frames=3))
    assert not unmasked(masks.block_causal(9, 4, 3))  # all blocks: causal
    assert not unmasked(masks.block_causal(9, 4, 3, q_frames=6))
    assert not unmasked(masks.teacher_forcing(3, 4, 1))
    assert not unmasked(masks.block_causal(12, 4, 3, q_frames=3, local_attn_blocks=2))
