"""Block-sparse flash attention for Hopper (sm_90a) in Pallas Mosaic GPU: forward, one-pass JVP, backward.

`hopper_forward(q, k, v, spec)` computes softmax attention under any `masks.MaskSpec` (full;
block_causal with q_offset, first_block_frames, a local window and sinks; teacher_forcing
with its [clean | noisy] halves) and returns the output and the natural-log log-sum-exp of the
scaled scores, as `reference.attention_reference(..., return_lse=True)` does.
`hopper_jvp(q, k, v, tq, tk, tv, spec)` also returns the output's tangent, in the same pass
(as `triton.flash.flash_jvp`): with s = scale * q k^T and its tangent
sd = scale * (tq k^T + q tk^T), each key tile updates, beside the running max m, sum l and
accumulated output O, the accumulated tangent Ot += (p * sd) v + p tv and the row sums
r += sum(p * sd) (all rescaled by the same exp2(m_old - m_new)); at the end
o = O / l and to = Ot / l - (r / l) o. Tangents given as None are zero: their loads and
matrix products are left out.

`hopper_backward(q, k, v, o, lse, do, spec)` returns `(dq, dk, dv)` from the forward's o and
lse, with delta = rowsum(dO * O) precomputed (float32) as in `triton.flash.flash_backward`, in
two kernels of the same producer / consumer structure (below; without the schedule barrier):
 * dQ: one CTA per (head, query tile of `2 * block_q` rows, batch), the forward's tiling and
   schedule. Each consumer holds its Q and dO rows (and their LSE and delta) in shared memory;
   the producer streams K/V tiles. Per key tile: S = Q K^T and dP = dO V^T (wgmma from shared
   memory), P = exp2(S c - lse2) with the saved LSE (no running max), dS = P (dP - delta),
   dQ += dS K (wgmma with dS from registers); at the end dQ * scale.
 * dK/dV: the transpose. One CTA per (head, key tile of `2 * block_q` keys, batch), whose
   consumers hold K and V rows; the producer streams `block_kv`-row tiles of Q and dO, and
   their LSE and delta rows, along `masks.tile_runs(spec, block_kv, 2 * block_q,
   transpose=True)` (`hopper_bwd_schedule`): each key tile walks only the query tiles whose
   rows may attend to it. Per query tile: S^T = K Q^T, dP^T = V dO^T, P^T, dS^T as above,
   dV += P^T dO and dK += dS^T Q (register operands); at the end dK * scale.
Boundary tiles (masked runs) take the same element mask as the forward, on S or on S^T (keys
along rows): integer arithmetic only. The LSE goes in as lse2 = lse * log2(e), +inf for rows
with no allowed key and for padding rows (padded to whole tiles of either kernel), so P is
exactly 0 there whatever the scores: query rows past the sequence (read as zeros) add nothing
to dK and dV. Accumulation is float32; P and dS are rounded to q's dtype for the products.

Structure (that of `prefix_attention`, FlashAttention-3 style): one CTA per (head, query tile
of `2 * block_q` rows, batch); a producer warpgroup streams the CTA's K/V tiles with TMA into a
ring of `stages` shared-memory slots, and two consumer warpgroups (`block_q` rows each) run
QK^T and PV with wgmma and an online softmax (log2 domain, float32 registers); a schedule
barrier alternates the consumers so that one's softmax overlaps the other's matrix products.

Block sparsity: the key tiles a CTA visits come from `masks.tile_runs(spec, 2 * block_q,
block_kv)`, the schedule of the Mosaic TPU kernel (per query tile, runs of consecutive key
tiles of one class), passed as two small int32 GMEM arrays: `start[row * runs + r]` =
2 * first key tile + masked, `end[row * runs + r]` = cumulative steps. Producer and consumers
walk the runs in order: a key tile outside every run is never loaded nor computed. Tiles of
an unmasked run ("full": every pair allowed, no padding) take the plain softmax step; tiles of
a masked run (boundary tiles, and tiles that hold padding keys) get the element mask: block
ids of the tile's query rows and key columns are computed once per row / column (int32
vectors in the WGMMA row / column layouts, integer arithmetic only), broadcast to the tile,
and scores the mask excludes become -inf through `jnp.where` (no boolean logic on tiles). The running max starts at -1e30, not
-inf, so a row whose first visited tiles hold no allowed key stays finite.

Lengths: any `Lq` and `Lk` (e.g. frames of 1560 tokens). Mosaic GPU builds the TMA copies of
the (8, 64)-tiled shared-memory tiles only over sequences whose length is a multiple of 8, so
other lengths are zero-padded to one first (a copy; Wan's 1560-token frames need none). Key
tiles running past the array are read as zeros (TMA bounds on loads) and are masked (the
schedule marks them partial);
outputs have their query rows padded to whole CTA tiles and are sliced afterwards (stores must
not rely on TMA bounds, see `prefix_attention`).

`interpret=True` runs the kernel in Pallas' GPU interpret mode on the CPU (the tests); as in
`prefix_attention`, only the PV product there is a `jnp.dot` of the same bf16/f16 P and V tile
(the interpreter's wgmma takes no register operand); in the JVP also the (p * sd) V and p tV
products; in the backward the dV, dK and dQ products (P^T dO, dS^T Q, dS K). Lowered for
sm_90a from a CPU host (tests), not yet compiled by ptxas nor run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.masks import MaskSpec, tile_runs
from pallas_kernels.mgpu.prefix_attention import LN2, LOG2E, SMEM_LIMIT, SMEM_OVERHEAD, check_qkv, pad_rows

M_INIT = -1e30  # the running max before any key: finite, so all-masked rows give no NaN
BIG = 1 << 29  # a block id past every real one (keys past the sequence); 3 * BIG fits in int32


@dataclasses.dataclass(frozen=True)
class HopperConfig:
    """Tiling of `hopper_forward` / `hopper_jvp`.

    block_q: query rows per consumer warpgroup (a CTA has two: `2 * block_q` rows, the query
      tile of the schedule).
    block_kv: keys per tile.
    stages: K/V tiles in flight (shared-memory ring slots).
    schedule_barrier: alternate the two consumer warpgroups (FA3 ping-pong).
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    schedule_barrier: bool = True

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64 or self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(
                f"block_q and block_kv must be positive multiples of 64, got {self.block_q}, {self.block_kv}"
            )
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")

    def smem_bytes(self, head_dim: int, itemsize: int = 2, q_tiles: int = 1, kv_rings: int = 2) -> int:
        """Shared memory of one CTA: `q_tiles` row tiles of both consumers (Q/O; in the JVP also
        tQ/tO), `kv_rings` rings of key tiles (K and V; in the JVP also tK, tV), LSE rows and the
        ~2.6 KB Mosaic GPU adds."""
        tiles = (2 * self.block_q * q_tiles + kv_rings * self.stages * self.block_kv) * head_dim * itemsize
        return tiles + 2 * self.block_q * 4 + SMEM_OVERHEAD


JVP_CONFIG = HopperConfig(block_kv=64)  # the JVP's default: four K/V rings fit at head_dim 128


def check_inputs(q, k, v, spec: MaskSpec, config: HopperConfig, tangents=None) -> None:
    """Raise one ValueError unless q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]` share one dtype
    (bfloat16 or float16), D is 64 or 128, the lengths are `spec`'s, the tangents `(tq, tk, tv)`
    (JVP; None entries are zero) match their primals and the tiling fits in shared memory."""
    check_qkv(q, k, v, "the Hopper kernel", kv_name="Lk")
    lq, d = q.shape[1], q.shape[-1]
    if not isinstance(spec, MaskSpec):
        raise ValueError(f"hopper kernels need a masks.MaskSpec, got {type(spec).__name__}")
    spec.check_lengths(lq, k.shape[1])
    q_tiles, kv_rings = 1, 2
    if tangents is not None:
        for name, t, x in zip(("tq", "tk", "tv"), tangents, (q, k, v)):
            if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
                raise ValueError(
                    f"tangent {name} {tuple(t.shape)}/{t.dtype} does not match its primal {tuple(x.shape)}/{x.dtype}"
                )
        q_tiles, kv_rings = 2, 2 + (tangents[1] is not None) + (tangents[2] is not None)
    need = config.smem_bytes(d, q_tiles=q_tiles, kv_rings=kv_rings)
    if need > SMEM_LIMIT:
        raise ValueError(
            f"{config} needs {need} bytes of shared memory for head_dim {d}"
            f"{' in the JVP' if tangents is not None else ''}, more than the {SMEM_LIMIT} an sm_90 CTA has; "
            "lower stages or block_kv"
        )


@functools.lru_cache(maxsize=256)
def hopper_schedule(spec: MaskSpec, config: HopperConfig):
    """The kernels' schedule: `(start, end, runs)` of `masks.tile_runs(spec, 2 * block_q,
    block_kv)`, flattened row-major to `[q_tiles * runs]` int32 (`start` = 2 * first key tile
    + masked, `end` = cumulative steps of the query tile), as numpy arrays."""
    return tile_runs(spec, 2 * config.block_q, config.block_kv).packed()


def _scale(q, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"hopper kernels need a positive score scale, got {scale}")
    return scale


def hopper_forward(
    q, k, v, spec: MaskSpec, *, scale: float | None = None, config: HopperConfig | None = None, interpret: bool = False
):
    """Block-sparse softmax attention of `spec` with its log-sum-exp.

    Args:
      q: `[B, Lq, H, D]`, bfloat16 or float16, D in {64, 128}.
      k, v: `[B, Lk, H, D]`, q's dtype.
      spec: the attention pattern (`masks.MaskSpec`); its lengths must be Lq, Lk.
      scale: score scale, default `D ** -0.5`.
      config: tiling (`HopperConfig`).
      interpret: run in Pallas' GPU interpret mode (CPU; slow, for tests).
    Returns:
      `o [B, Lq, H, D]` in q's dtype and `lse [B, H, Lq]` float32 (natural log of the sum of
      exp of the scaled allowed scores; -inf for a row with no allowed key, whose output is 0).
    """
    config = HopperConfig() if config is None else config
    check_inputs(q, k, v, spec, config)
    scale = _scale(q, scale)
    o, _, lse = _run(q, k, v, None, spec=spec, scale=scale, config=config, interpret=bool(interpret))
    return o, lse


def hopper_jvp(
    q,
    k,
    v,
    tq,
    tk,
    tv,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    config: HopperConfig | None = None,
    interpret: bool = False,
):
    """Block-sparse softmax attention of `spec` and its tangent, in one pass.

    Args:
      q: `[B, Lq, H, D]`, bfloat16 or float16, D in {64, 128}; k, v: `[B, Lk, H, D]`.
      tq, tk, tv: tangents of q, k, v (their shapes and dtype), or None for a zero tangent.
      spec, scale, interpret: as in `hopper_forward`.
      config: tiling (default `JVP_CONFIG`: 64-key tiles, so the K, V, tK and tV rings fit).
    Returns:
      `o [B, Lq, H, D]`, its tangent `to [B, Lq, H, D]` (q's dtype) and `lse [B, H, Lq]` float32.
    """
    config = JVP_CONFIG if config is None else config
    tangents = (tq, tk, tv)
    check_inputs(q, k, v, spec, config, tangents)
    scale = _scale(q, scale)
    return _run(q, k, v, tangents, spec=spec, scale=scale, config=config, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def _run(q, k, v, tangents, *, spec, scale, config, interpret):
    start, end, runs = hopper_schedule(spec, config)
    lq = q.shape[1]
    q, k, v = (pad_rows(x) for x in (q, k, v))
    if tangents is not None:
        tangents = tuple(None if t is None else pad_rows(t) for t in tangents)
    o, to, lse = _call_kernel(
        q, k, v, tangents, jnp.asarray(start), jnp.asarray(end), runs, spec, scale, config, interpret
    )
    return o[:, :lq], None if to is None else to[:, :lq], lse[..., :lq]


def _mask_scores(spec: MaskSpec, s, row0, col0, transpose: bool = False):
    """`s` `[bq, bk]` (WGMMA layout) with the scores `spec` excludes set to -inf, for the tile
    whose first query is `row0` and first key `col0`; equal to `masks.allowed`. With
    `transpose`, `s` is a `[bk, bq]` tile of transposed scores (keys along rows: the dK/dV
    kernel), masked the same way.

    Block ids are computed once per query row and key column, on int32 vectors in the WGMMA
    row / column layouts, with integer arithmetic only (0/1 flags from `min(x // n, 1)`, no
    boolean vectors: Mosaic GPU has no register layout for i1 vectors of that shape); keys past
    the sequence get block ids past `BIG`. Each condition is then one broadcast compare and one
    `jnp.where` on the tile. Full attention needs only the key bound, as one tile iota."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    shape = s.shape
    qd, kd = (1, 0) if transpose else (0, 1)  # the query and key dimensions of the tile
    bq, bk = shape[qd], shape[kd]
    neg = jnp.float32(-jnp.inf)
    if spec.kind == "full":
        key = plgpu.broadcasted_iota(jnp.int32, shape, kd, layout=plgpu.Layout.WGMMA)
        return jnp.where(key + col0 < spec.kv_len, s, neg)
    rows = row0 + plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=plgpu.Layout.WGMMA.reduce(1 - qd))
    cols = col0 + plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=plgpu.Layout.WGMMA.reduce(1 - kd))

    def row_b(x):
        return lax.broadcast_in_dim(x, shape, [qd])

    def col_b(x):
        return lax.broadcast_in_dim(x, shape, [kd])

    def flag(x, n: int):  # 1 where x >= n, else 0 (x >= 0)
        return jnp.minimum(lax.div(x, jnp.int32(n)), 1)

    def block_of(pos):  # masks.block_of for pos >= 0: 0 in the first block's frames
        frame = lax.div(pos, jnp.int32(spec.tokens_per_frame))
        shifted = jnp.maximum(frame - spec.first_block_frames + spec.block_frames, 0)
        return lax.div(shifted, jnp.int32(spec.block_frames))

    past_keys = flag(cols, spec.kv_len)
    if spec.kind == "block_causal":
        qb = block_of(rows + spec.q_offset)
        kb = block_of(cols)
        s = jnp.where(col_b(kb + past_keys * BIG) <= row_b(qb), s, neg)
    else:  # teacher_forcing: clean query -> clean blocks <= its own; noisy -> clean < own, noisy == own
        half = spec.q_len // 2
        q_noisy = flag(rows, half)
        k_noisy = flag(cols, half)
        qb = block_of(rows - q_noisy * half)
        kb = block_of(cols - k_noisy * half)
        clean_limit = qb - q_noisy
        noisy_target = qb * q_noisy + q_noisy - 1  # its block if noisy, -1 (no key) if clean
        kb_clean = kb + (k_noisy + past_keys) * BIG
        kb_noisy = kb + (1 - k_noisy + past_keys) * BIG
        noisy_ok = jnp.where(col_b(kb_noisy) == row_b(noisy_target), s, neg)
        s = jnp.where(col_b(kb_clean) <= row_b(clean_limit), s, noisy_ok)
    if spec.local_attn_blocks > 0:  # kb > qb - W, or a sink: kb + W > qb, sinks moved past BIG
        kb_win = kb + spec.local_attn_blocks
        if spec.sink_blocks > 0:
            kb_win = kb_win + (1 - flag(kb, spec.sink_blocks)) * BIG
        s = jnp.where(col_b(kb_win) > row_b(qb), s, neg)
    return s


def _call_kernel(q, k, v, tangents, start, end, runs, spec: MaskSpec, scale, cfg: HopperConfig, interpret: bool):
    """The kernel: forward (`tangents` None) or JVP (`tangents` = (tq, tk, tv), None entries zero).
    Returns `(o, to or None, lse)` with query rows padded to whole CTA tiles."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    dtype = q.dtype
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    q_tiles = pl.cdiv(q_len, 2 * bq)
    c = scale * LOG2E  # scores in log2 units: exp(s * scale) = exp2(s * c)
    jvp = tangents is not None
    has_tq, has_tk, has_tv = (t is not None for t in tangents) if jvp else (False, False, False)
    has_sd = has_tq or has_tk  # the scores have a tangent

    def kernel(start_ref, end_ref, q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, o_ref, to_ref, lse_ref, scoped):
        (qo_smem2, k_smem, v_smem, lse_smem2, t_smem2, tk_smem, tv_smem), barriers, (k_free, v_free), turn = scoped
        (k_ready, v_ready, q_ready), (tk_ready, tv_ready, tq_ready) = barriers
        head = lax.axis_index("heads")
        q_tile = q_tiles - 1 - lax.axis_index("q_tiles")  # the longest rows of causal masks first
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        base = q_tile * runs
        steps = end_ref[base + runs - 1]  # key tiles this CTA visits

        def run_bounds(r):
            """(first step, end step, first key tile - first step, masked) of run r."""
            lo = jnp.where(r > 0, end_ref[base + jnp.maximum(r - 1, 0)], 0)
            packed = start_ref[base + r]
            return lo, end_ref[base + r], lax.shift_right_logical(packed, 1) - lo, jnp.bitwise_and(packed, 1)

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def ping():
            if cfg.schedule_barrier:
                take_turn()

        def wait_k(slot):
            plgpu.barrier_wait(k_ready.at[slot])
            if has_tk:
                plgpu.barrier_wait(tk_ready.at[slot])

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            t_smem = t_smem2.at[wg] if jvp else None  # tQ in, tO out
            row0 = q_tile * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), head], qo_smem, q_ready.at[wg])
            if has_tq:
                plgpu.copy_gmem_to_smem(tq_ref.at[b, pl.ds(row0, bq), head], t_smem, tq_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            if has_tq:
                plgpu.barrier_wait(tq_ready.at[wg])

            rows_layout = plgpu.Layout.WGMMA.reduce(1)
            m_i = plgpu.layout_cast(jnp.full((bq,), M_INIT, jnp.float32), rows_layout)
            l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), rows_layout)
            acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            carry = (acc, m_i, l_i)
            if jvp:
                r_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), rows_layout)
                acct = plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                carry = (*carry, acct, r_i)

            @pl.when(steps > 0)
            def _():
                wait_k(0)

            if cfg.schedule_barrier:
                pl.when(wg == 1)(take_turn)

            def step(i, carry, col_shift, masked: bool):
                acc, m_i, l_i, *tan = carry
                slot = lax.rem(i, jnp.int32(stages))
                k_t = k_smem.at[slot].transpose((1, 0))

                def qk_scope(s_ref, sd_ref):
                    plgpu.wgmma(s_ref, qo_smem, k_t)
                    if has_tq:
                        plgpu.wgmma(sd_ref, t_smem, k_t)
                    if has_tk:
                        plgpu.wgmma(sd_ref, qo_smem, tk_smem.at[slot].transpose((1, 0)))
                    ping()
                    return s_ref[...], (sd_ref[...] if has_sd else None)

                tile = plgpu.ACC((bq, bkv), jnp.float32)
                s, sd = pl.run_scoped(qk_scope, tile, tile if has_sd else None)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    s = _mask_scores(spec, s, row0, (col_shift + i) * bkv)
                m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                out = (acc, l_i, m_new, p16)
                if jvp:
                    acct, r_i = tan
                    acct = acct * lax.broadcast_in_dim(alpha, acct.shape, [0])
                    r_i = r_i * alpha
                    pd16 = None
                    if has_sd:  # masked scores have p = 0, so p * sd = 0 there
                        pd = p * (sd * scale)
                        r_i = r_i + pd.sum(axis=1)
                        pd16 = pd.astype(dtype)
                    out = (*out, acct, r_i, pd16)
                acc, l_i, m_new, p16, *tan = lax.optimization_barrier(out)
                if cfg.schedule_barrier:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                if has_tv:
                    plgpu.barrier_wait(tv_ready.at[slot])
                if cfg.schedule_barrier:
                    plgpu.barrier_wait(turn)

                def wait_next_k():
                    nxt = i + 1

                    @pl.when(nxt < steps)
                    def _():
                        wait_k(lax.rem(nxt, jnp.int32(stages)))

                v_tile = v_smem.at[slot]
                if interpret:  # the interpreter's wgmma takes no register operand
                    f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
                    acc = acc + f32(p16, v_tile[...])
                    if jvp:
                        acct, r_i, pd16 = tan
                        if has_sd:
                            acct = acct + f32(pd16, v_tile[...])
                        if has_tv:
                            acct = acct + f32(p16, tv_smem.at[slot][...])
                    wait_next_k()
                elif not jvp:

                    def pv_state(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_tile)
                        wait_next_k()

                    acc = pl.run_state(pv_state)(plgpu.ACC.init(acc))
                else:
                    acct, r_i, pd16 = tan

                    def pv_jvp_state(refs):  # one wait for all three products
                        acc_ref, acct_ref = refs
                        plgpu.wgmma(acc_ref, p16, v_tile)
                        if has_sd:
                            plgpu.wgmma(acct_ref, pd16, v_tile)
                        if has_tv:
                            plgpu.wgmma(acct_ref, p16, tv_smem.at[slot])
                        wait_next_k()

                    acc, acct = pl.run_state(pv_jvp_state)((plgpu.ACC.init(acc), plgpu.ACC.init(acct)))
                plgpu.barrier_arrive(v_free.at[slot])
                if jvp:
                    return acc, m_new, l_i, acct, r_i
                return acc, m_new, l_i

            def run(r, carry):
                lo, hi, col_shift, masked = run_bounds(r)
                plain_hi = jnp.where(masked == 0, hi, lo)
                masked_hi = jnp.where(masked == 1, hi, lo)
                carry = lax.fori_loop(lo, plain_hi, functools.partial(step, col_shift=col_shift, masked=False), carry)
                return lax.fori_loop(lo, masked_hi, functools.partial(step, col_shift=col_shift, masked=True), carry)

            acc, m_i, l_i, *tan = lax.fori_loop(0, runs, run, carry)
            if cfg.schedule_barrier:
                pl.when(wg == 0)(take_turn)

            empty = l_i == 0.0
            inv_l = lax.broadcast_in_dim(1.0 / jnp.where(empty, 1.0, l_i), acc.shape, [0])
            o = acc * inv_l
            qo_smem[...] = o.astype(dtype)
            if jvp:
                acct, r_i = tan
                to = acct * inv_l - lax.broadcast_in_dim(r_i, acc.shape, [0]) * inv_l * o
                t_smem[...] = to.astype(dtype)
            lse_smem2.at[wg][...] = jnp.where(empty, -jnp.inf, m_i * LN2 + jnp.log(jnp.where(empty, 1.0, l_i)))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(row0, bq), head])
            if jvp:
                plgpu.copy_smem_to_gmem(t_smem, to_ref.at[b, pl.ds(row0, bq), head])
            plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, head, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(j, _, col_shift):
                slot = lax.rem(j, jnp.int32(stages))
                rows = (b, pl.ds((col_shift + j) * bkv, bkv), head)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(k_free.at[slot])

                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                if has_tk:
                    plgpu.copy_gmem_to_smem(tk_ref.at[rows], tk_smem.at[slot], tk_ready.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(v_free.at[slot])

                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])
                if has_tv:
                    plgpu.copy_gmem_to_smem(tv_ref.at[rows], tv_smem.at[slot], tv_ready.at[slot])

            def run(r, _):
                lo, hi, col_shift, _masked = run_bounds(r)
                lax.fori_loop(lo, hi, functools.partial(load, col_shift=col_shift), None)

            lax.fori_loop(0, runs, run, None)

            def drain(t, _):  # see the last tiles released, so every barrier phase is observed
                slot = lax.rem(t, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

            lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

    def body(start_ref, end_ref, *refs):
        refs = list(refs)
        q_ref, k_ref, v_ref = refs[:3]
        refs = refs[3:]
        tq_ref = refs.pop(0) if has_tq else None
        tk_ref = refs.pop(0) if has_tk else None
        tv_ref = refs.pop(0) if has_tv else None
        o_ref, to_ref, lse_ref = refs if jvp else (refs[0], None, refs[1])
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        rows_tile = plgpu.SMEM((2, bq, head_dim), dtype, transforms=tiled)
        ring = plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=tiled)
        smem = [
            rows_tile,
            ring,
            ring,
            plgpu.SMEM((2, bq), jnp.float32),
            rows_tile if jvp else None,
            ring if has_tk else None,
            ring if has_tv else None,
        ]
        ready = (
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
            (
                plgpu.Barrier(num_barriers=stages) if has_tk else None,
                plgpu.Barrier(num_barriers=stages) if has_tv else None,
                plgpu.Barrier(num_barriers=2) if has_tq else None,
            ),
        )
        pl.run_scoped(
            lambda *scoped: kernel(
                start_ref, end_ref, q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, o_ref, to_ref, lse_ref, scoped
            ),
            smem,
            ready,
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    def crm_hopper_forward(*refs):  # the kernels' names in traces
        body(*refs)

    def crm_hopper_jvp(*refs):
        body(*refs)

    rows = q_tiles * 2 * bq  # whole tiles: no store runs past the arrays
    out = jax.ShapeDtypeStruct((batch, rows, heads, head_dim), dtype)
    lse = jax.ShapeDtypeStruct((batch, heads, rows), jnp.float32)
    kw = {}
    if interpret:
        kw["interpret"] = plgpu.InterpretGPUParams()
    args = [start, end, q, k, v] + ([t for t in tangents if t is not None] if jvp else [])
    results = plgpu.kernel(
        crm_hopper_jvp if jvp else crm_hopper_forward,
        out_type=[out, out, lse] if jvp else [out, lse],
        grid=(heads, q_tiles, batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(*args)
    if jvp:
        return tuple(results)
    return results[0], None, results[1]


BWD_CONFIG = HopperConfig(block_kv=64)  # the backward's default: both kernels fit at head_dim 128


def _bwd_smem_bytes(config: HopperConfig, head_dim: int) -> int:
    """Shared memory of the larger backward CTA: two row tiles per consumer (Q, dO or K, V),
    two rings of `block_kv`-row tiles (K, V or Q, dO) and the float32 LSE / delta rows."""
    rows = 2 * 2 * config.block_q * 4 + 2 * config.stages * config.block_kv * 4
    return config.smem_bytes(head_dim, q_tiles=2, kv_rings=2) + rows


@functools.lru_cache(maxsize=256)
def hopper_bwd_schedule(spec: MaskSpec, config: HopperConfig):
    """The dK/dV kernel's schedule: `(start, end, runs)` as in `hopper_schedule`, of the
    transposed tiles `masks.tile_runs(spec, block_kv, 2 * block_q, transpose=True)`: per key
    tile of `2 * block_q` keys, the runs of `block_kv`-row query tiles whose rows may attend
    to it."""
    return tile_runs(spec, config.block_kv, 2 * config.block_q, transpose=True).packed()


def hopper_backward(
    q,
    k,
    v,
    o,
    lse,
    do,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    config: HopperConfig | None = None,
    interpret: bool = False,
):
    """Gradients of `hopper_forward`'s output: block-sparse, two kernels (dQ; dK and dV).

    Args:
      q, k, v, spec, scale, interpret: as in `hopper_forward`.
      o: `[B, Lq, H, D]` the forward's output (q's dtype); lse: `[B, H, Lq]` float32 its
        log-sum-exp (-inf for rows with no allowed key).
      do: `[B, Lq, H, D]` the output's cotangent (q's dtype).
      config: tiling (default `BWD_CONFIG`). The dQ kernel tiles as the forward (CTAs of
        `2 * block_q` query rows, `block_kv`-key tiles); the dK/dV kernel transposes it (CTAs of
        `2 * block_q` keys, `block_kv`-row query tiles). `schedule_barrier` is not used.
    Returns:
      `(dq, dk, dv)`, shaped and typed as q, k, v.
    """
    config = BWD_CONFIG if config is None else config
    check_inputs(q, k, v, spec, config)
    b, lq, h, d = q.shape
    for name, x in (("o", o), ("do", do)):
        if x.shape != q.shape or x.dtype != q.dtype:
            raise ValueError(
                f"{name} {tuple(x.shape)}/{x.dtype} must be shaped and typed as q {tuple(q.shape)}/{q.dtype}"
            )
    if lse.shape != (b, h, lq) or lse.dtype != jnp.float32:
        raise ValueError(f"lse must be float32 [B={b}, H={h}, Lq={lq}], got {tuple(lse.shape)}/{lse.dtype}")
    need = _bwd_smem_bytes(config, d)
    if need > SMEM_LIMIT:
        raise ValueError(
            f"{config} needs {need} bytes of shared memory for head_dim {d} in the backward, more than the "
            f"{SMEM_LIMIT} an sm_90 CTA has; lower stages or block_kv"
        )
    scale = _scale(q, scale)
    return _run_bwd(q, k, v, o, lse, do, spec=spec, scale=scale, config=config, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("spec", "scale", "config", "interpret"))
def _run_bwd(q, k, v, o, lse, do, *, spec, scale, config, interpret):
    lq, lk = q.shape[1], k.shape[1]
    # delta = rowsum(dO * O) (float32); LSE in log2 units, +inf where a row has no allowed key
    # or is padding (then p = exp2(s - lse) = 0 exactly); both padded to whole tiles of either
    # kernel, so their copies never run past the arrays.
    delta = jnp.einsum("bqhd,bqhd->bhq", o.astype(jnp.float32), do.astype(jnp.float32))
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)
    tile = math.lcm(2 * config.block_q, config.block_kv)
    extra = -lq % tile
    lse2 = jnp.pad(lse2, ((0, 0), (0, 0), (0, extra)), constant_values=jnp.inf)
    delta = jnp.pad(delta, ((0, 0), (0, 0), (0, extra)))
    q, k, v, do = (pad_rows(x) for x in (q, k, v, do))
    start, end, runs = hopper_schedule(spec, config)
    dq = _call_dq_kernel(
        q, k, v, do, lse2, delta, jnp.asarray(start), jnp.asarray(end), runs, spec, scale, config, interpret
    )
    start, end, runs = hopper_bwd_schedule(spec, config)
    dk, dv = _call_dkv_kernel(
        q, k, v, do, lse2, delta, jnp.asarray(start), jnp.asarray(end), runs, spec, scale, config, interpret
    )
    return dq[:, :lq], dk[:, :lk], dv[:, :lk]


def _run_bounds(start_ref, end_ref, base, r):
    """(first step, end step, first column tile - first step, masked) of run r of the row
    whose runs start at `base` in the schedule arrays."""
    lo = jnp.where(r > 0, end_ref[base + jnp.maximum(r - 1, 0)], 0)
    packed = start_ref[base + r]
    return lo, end_ref[base + r], lax.shift_right_logical(packed, 1) - lo, jnp.bitwise_and(packed, 1)


def _walk(start_ref, end_ref, base, runs, step, carry):
    """Run `step(i, carry, col_shift, masked)` over the row's schedule: plain steps on
    unmasked runs, masked steps on masked runs (the element mask is compiled only there)."""

    def run(r, carry):
        lo, hi, col_shift, masked = _run_bounds(start_ref, end_ref, base, r)
        plain_hi = jnp.where(masked == 0, hi, lo)
        masked_hi = jnp.where(masked == 1, hi, lo)
        carry = lax.fori_loop(lo, plain_hi, functools.partial(step, col_shift=col_shift, masked=False), carry)
        return lax.fori_loop(lo, masked_hi, functools.partial(step, col_shift=col_shift, masked=True), carry)

    return lax.fori_loop(0, runs, run, carry)


def _bwd_kernel(
    row_inputs,
    ring_inputs,
    lse2,
    delta,
    start,
    end,
    runs,
    spec: MaskSpec,
    scale,
    cfg: HopperConfig,
    interpret: bool,
    dkv: bool,
):
    """One backward kernel. Each CTA (head, row tile of `2 * block_q` rows, batch) has two
    consumer warpgroups holding `block_q` rows of the two `row_inputs` each in shared memory
    and a producer streaming `block_kv`-row tiles of the two `ring_inputs` (and, for dK/dV,
    their LSE and delta rows) with TMA through a ring of `stages` slots, along the schedule.

    dQ (`dkv` False): rows Q, dO; ring K, V. Per key tile: S = Q K^T, dP = dO V^T (wgmma from
    shared memory), P = exp2(S c - lse2), dS = P (dP - delta), dQ += dS K.
    dK/dV (`dkv` True): rows K, V; ring Q, dO, lse2, delta. Per query tile: S^T = K Q^T,
    dP^T = V dO^T, P^T = exp2(S^T c - lse2), dS^T = P^T (dP^T - delta), dV += P^T dO,
    dK += dS^T Q. Returns the outputs with rows padded to whole CTA tiles."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    x0, x1 = row_inputs
    batch, row_len, heads, head_dim = x0.shape
    dtype = x0.dtype
    bq, bkv, stages = cfg.block_q, cfg.block_kv, cfg.stages
    row_tiles = pl.cdiv(row_len, 2 * bq)
    c = scale * LOG2E
    f32 = jnp.float32
    # the per-query vectors along the tile's query dimension: rows (dQ) or columns (dK/dV)
    qd = 1 if dkv else 0
    vec_layout = plgpu.Layout.WGMMA.reduce(1 - qd)

    def kernel(start_ref, end_ref, x0_ref, x1_ref, y0_ref, y1_ref, lse_ref, delta_ref, out_refs, scoped):
        smem, (x_ready, y0_ready, y1_ready, l_ready, d_ready), (y0_free, y1_free) = scoped
        x0_smem2, x1_smem2, y0_smem, y1_smem, l_smem, d_smem = smem
        head = lax.axis_index("heads")
        tile = lax.axis_index("rows")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        base = tile * runs
        steps = end_ref[base + runs - 1]

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            x0_smem, x1_smem = x0_smem2.at[wg], x1_smem2.at[wg]
            row0 = tile * (2 * bq) + wg * bq
            rows = (b, pl.ds(row0, bq), head)
            plgpu.copy_gmem_to_smem(x0_ref.at[rows], x0_smem, x_ready.at[wg])
            plgpu.copy_gmem_to_smem(x1_ref.at[rows], x1_smem, x_ready.at[2 + wg])
            if not dkv:  # the rows' LSE and delta, once
                plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(row0, bq)], l_smem.at[wg], x_ready.at[4 + wg])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(row0, bq)], d_smem.at[wg], x_ready.at[6 + wg])
            for j in range(2 if dkv else 4):
                plgpu.barrier_wait(x_ready.at[2 * j + wg])
            if not dkv:
                lse_rows = plgpu.load(l_smem.at[wg], layout=vec_layout)
                delta_rows = plgpu.load(d_smem.at[wg], layout=vec_layout)

            def zeros():
                return plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, f32), plgpu.Layout.WGMMA)

            carry = (zeros(), zeros()) if dkv else (zeros(),)

            def step(i, carry, col_shift, masked: bool):
                slot = lax.rem(i, jnp.int32(stages))
                plgpu.barrier_wait(y0_ready.at[slot])
                plgpu.barrier_wait(y1_ready.at[slot])
                y0_tile, y1_tile = y0_smem.at[slot], y1_smem.at[slot]

                def scores(s_ref, dp_ref):
                    plgpu.wgmma(s_ref, x0_smem, y0_tile.transpose((1, 0)))  # S (dQ) or S^T (dK/dV)
                    plgpu.wgmma(dp_ref, x1_smem, y1_tile.transpose((1, 0)))  # dP or dP^T
                    return s_ref[...], dp_ref[...]

                acc_tile = plgpu.ACC((bq, bkv), f32)
                s, dp = pl.run_scoped(scores, acc_tile, acc_tile)
                col0 = (col_shift + i) * bkv
                if dkv:
                    plgpu.barrier_wait(l_ready.at[slot])
                    plgpu.barrier_wait(d_ready.at[slot])
                    lse_v = plgpu.load(l_smem.at[slot], layout=vec_layout)
                    delta_v = plgpu.load(d_smem.at[slot], layout=vec_layout)
                    if masked:
                        s = _mask_scores(spec, s, col0, row0, transpose=True)
                else:
                    lse_v, delta_v = lse_rows, delta_rows
                    plgpu.barrier_arrive(y1_free.at[slot])  # V is done with
                    if masked:
                        s = _mask_scores(spec, s, row0, col0)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(lse_v, s.shape, [qd]))
                ds = p * (dp - lax.broadcast_in_dim(delta_v, s.shape, [qd]))
                ds16 = ds.astype(dtype)
                if dkv:
                    dk_acc, dv_acc = carry
                    p16 = p.astype(dtype)
                    if interpret:  # the interpreter's wgmma takes no register operand
                        dv_acc = dv_acc + jnp.dot(p16, y1_tile[...], preferred_element_type=f32)
                        dk_acc = dk_acc + jnp.dot(ds16, y0_tile[...], preferred_element_type=f32)
                    else:

                        def dkv_state(refs):
                            dk_ref, dv_ref = refs
                            plgpu.wgmma(dv_ref, p16, y1_tile)
                            plgpu.wgmma(dk_ref, ds16, y0_tile)

                        dk_acc, dv_acc = pl.run_state(dkv_state)((plgpu.ACC.init(dk_acc), plgpu.ACC.init(dv_acc)))
                    plgpu.barrier_arrive(y1_free.at[slot])
                    plgpu.barrier_arrive(y0_free.at[slot])
                    return dk_acc, dv_acc
                (dq_acc,) = carry
                if interpret:
                    dq_acc = dq_acc + jnp.dot(ds16, y0_tile[...], preferred_element_type=f32)
                else:

                    def dq_state(acc_ref):
                        plgpu.wgmma(acc_ref, ds16, y0_tile)

                    dq_acc = pl.run_state(dq_state)(plgpu.ACC.init(dq_acc))
                plgpu.barrier_arrive(y0_free.at[slot])
                return (dq_acc,)

            accs = _walk(start_ref, end_ref, base, runs, step, carry)
            if dkv:  # dK = scale dS^T Q into K's tile, dV into V's
                outs = ((accs[0] * scale, x0_smem), (accs[1], x1_smem))
            else:
                outs = ((accs[0] * scale, x0_smem),)
            for acc, buf in outs:
                buf[...] = acc.astype(dtype)
            plgpu.commit_smem()
            for (_, buf), out_ref in zip(outs, out_refs):
                plgpu.copy_smem_to_gmem(buf, out_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(j, _, col_shift, masked):
                del masked
                slot = lax.rem(j, jnp.int32(stages))
                col0 = (col_shift + j) * bkv
                rows = (b, pl.ds(col0, bkv), head)

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(y0_free.at[slot])

                plgpu.copy_gmem_to_smem(y0_ref.at[rows], y0_smem.at[slot], y0_ready.at[slot])
                if dkv:
                    plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(col0, bkv)], l_smem.at[slot], l_ready.at[slot])

                @pl.when(j >= stages)
                def _():
                    plgpu.barrier_wait(y1_free.at[slot])

                plgpu.copy_gmem_to_smem(y1_ref.at[rows], y1_smem.at[slot], y1_ready.at[slot])
                if dkv:
                    plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(col0, bkv)], d_smem.at[slot], d_ready.at[slot])

            _walk(start_ref, end_ref, base, runs, load, None)

            def drain(t, _):  # see the last tiles released, so every barrier phase is observed
                slot = lax.rem(t, jnp.int32(stages))
                plgpu.barrier_wait(y0_free.at[slot])
                plgpu.barrier_wait(y1_free.at[slot])

            lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

    def body(start_ref, end_ref, x0_ref, x1_ref, y0_ref, y1_ref, lse_ref, delta_ref, *out_refs):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        rows_tile = plgpu.SMEM((2, bq, head_dim), dtype, transforms=tiled)
        ring = plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=tiled)
        vecs = plgpu.SMEM((stages, bkv) if dkv else (2, bq), f32)
        ring_barrier = plgpu.Barrier(num_barriers=stages)
        pl.run_scoped(
            lambda *scoped: kernel(
                start_ref, end_ref, x0_ref, x1_ref, y0_ref, y1_ref, lse_ref, delta_ref, out_refs, scoped
            ),
            (rows_tile, rows_tile, ring, ring, vecs, vecs),
            (plgpu.Barrier(num_barriers=8), *(ring_barrier,) * 4),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            collective_axes="wg",
        )

    def crm_hopper_bwd_dq(*refs):  # the kernels' names in traces
        body(*refs)

    def crm_hopper_bwd_dkv(*refs):
        body(*refs)

    out = jax.ShapeDtypeStruct((batch, row_tiles * 2 * bq, heads, head_dim), dtype)
    kw = {}
    if interpret:
        kw["interpret"] = plgpu.InterpretGPUParams()
    results = plgpu.kernel(
        crm_hopper_bwd_dkv if dkv else crm_hopper_bwd_dq,
        out_type=[out, out] if dkv else [out],
        grid=(heads, row_tiles, batch),
        grid_names=("heads", "rows", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(start, end, *row_inputs, *ring_inputs, lse2, delta)
    return tuple(results)


def _call_dq_kernel(q, k, v, do, lse2, delta, start, end, runs, spec, scale, cfg, interpret):
    (dq,) = _bwd_kernel((q, do), (k, v), lse2, delta, start, end, runs, spec, scale, cfg, interpret, dkv=False)
    return dq


def _call_dkv_kernel(q, k, v, do, lse2, delta, start, end, runs, spec, scale, cfg, interpret):
    return _bwd_kernel((k, v), (q, do), lse2, delta, start, end, runs, spec, scale, cfg, interpret, dkv=True)
