"""Flash attention of a query block over a KV-cache prefix, for Hopper, in Pallas Mosaic GPU.

The streaming sampler's hot op: a chunk's queries `q [B, Lq, H, D]` attend to the first
`kv_len` keys of a layer's cache buffer `k, v [B, S, H, D]` (the cached chunks and the chunk
itself), with no other mask. `kv_len` may be traced, so one compilation serves every cache
length. Forward only (the sampler needs no gradients).

The kernel is written for sm_90a in the FlashAttention-3 style: per CTA one producer
warpgroup streams K/V tiles with TMA into a ring of `stages` shared-memory slots, and two
consumer warpgroups (`block_q` query rows each) run QK^T and PV on the tensor cores (wgmma)
with an online softmax in float32 registers; a schedule barrier alternates the two consumers
so that one's softmax overlaps the other's matrix products. What it adds for the cache:

  * a traced valid length: each CTA runs `cdiv(kv_len, block_kv)` key tiles (its share of
    them), unmasked except the one tile that straddles `kv_len`, where keys at or past it
    get -inf before the softmax;
  * split keys (`splits > 1`): the keys are divided into `splits` ranges run by separate
    CTAs, which write normalised partial outputs and log-sum-exps that XLA merges; this fills
    the GPU in whole waves when `B * H * q_tiles` alone would leave a ragged last wave
    (one chunk of `wan_1_3b` at 480p: 12 heads x 37 query tiles = 444 CTAs on 132 SMs);
  * any `Lq` and `S`: lengths that are not a multiple of 8 are zero-padded to one first (the
    TMA copies of the (8, 64)-tiled shared-memory tiles need it; Wan's 1560-token frames need
    no copy); key tiles that run past the buffer are read as zeros (TMA bounds) and are past
    `kv_len`, so masked; the kernel's outputs have their query rows padded to whole
    CTA tiles (`2 * block_q`) and are sliced afterwards. Stores must not rely on TMA bounds:
    Mosaic GPU issues a contiguous slice (e.g. one row of log-sum-exps) as a bulk copy that is
    clamped only to the end of the whole array, so rows past `Lq` would land in the next
    head's row (seen on an H100 as a moving 1e-2 error before the padding).

`interpret=True` runs the kernel in Pallas' GPU interpret mode on the CPU (the tests). The
interpreter's wgmma takes no register operand and no carried accumulator, so there the PV
product is a `jnp.dot` of the same bf16/f16 P and V tile, added to the float32 accumulator
(the same arithmetic; everything else -- TMA, barriers, the ring, masks, splits -- is the
code that runs on the GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.reference import attention_reference

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_LIMIT = 227 * 1024  # an sm_90 CTA's shared-memory limit
ROW_ALIGN = 8  # sequence lengths the TMA copies take (the tiling's rows); others are padded
SMEM_OVERHEAD = 2648  # what Mosaic GPU allocated beyond the tiles in the measured case


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
    """Tiling of `prefix_attention`.

    block_q: query rows per consumer warpgroup (a CTA has two: `2 * block_q` rows).
    block_kv: keys per tile.
    stages: K/V tiles in flight (shared-memory ring slots).
    splits: key ranges per query tile run by separate CTAs and merged by log-sum-exp.
    schedule_barrier: alternate the two consumer warpgroups (FA3 ping-pong).
    """

    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    splits: int = 1
    schedule_barrier: bool = True

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64 or self.block_q <= 0 or self.block_kv <= 0:
            raise ValueError(
                f"block_q and block_kv must be positive multiples of 64, got {self.block_q}, {self.block_kv}"
            )
        if self.stages < 2:
            raise ValueError(f"stages must be at least 2, got {self.stages}")
        if self.splits < 1:
            raise ValueError(f"splits must be at least 1, got {self.splits}")

    def smem_bytes(self, head_dim: int, itemsize: int = 2) -> int:
        """Shared memory of one CTA: Q/O tiles of both consumers, the K and V rings, LSE rows, and
        ~2.6 KB that Mosaic GPU adds (barriers, alignment; measured: stages=3 at head_dim 128
        needs 232,536 bytes, 88 more than an H100 CTA has)."""
        tiles = (2 * self.block_q + 2 * self.stages * self.block_kv) * head_dim * itemsize
        return tiles + 2 * self.block_q * 4 + SMEM_OVERHEAD


def num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 / H200 SXM)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def default_config(q_shape, k_shape, sms: int | None = None) -> PrefixConfig:
    """The tiling for q `[B, Lq, H, D]` over a `[B, S, H, D]` buffer: the fewest key splits (up to
    4) that run the CTAs in waves at least 90 % full, else the splits that fill them best (one
    CTA per SM: the kernel uses most of its shared memory and registers)."""
    b, lq, h, _ = q_shape
    base = PrefixConfig()
    sms = num_sms() if sms is None else sms
    ctas = b * h * -(-lq // (2 * base.block_q))
    fill = {s: ctas * s / sms / math.ceil(ctas * s / sms) for s in (1, 2, 3, 4)}
    good = [s for s, f in fill.items() if f >= 0.9]
    return dataclasses.replace(base, splits=good[0] if good else max(fill, key=fill.get))


def check_qkv(q, k, v, who: str, kv_name: str = "S") -> None:
    """Raise one ValueError unless q `[B, Lq, H, D]`, k and v `[B, kv_name, H, D]` share one dtype
    of `DTYPES` and D is in `HEAD_DIMS` (what the Mosaic-GPU kernels take; `who` names the caller)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{who} expects q [B, Lq, H, D], k and v [B, {kv_name}, H, D]; got "
            f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(
            f"k and v must be [B={b}, {kv_name}, H={h}, D={d}] alike; got k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"{who} supports head_dim in {HEAD_DIMS}, got {d}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(f"{who} needs q, k, v of one dtype, bfloat16 or float16; got {q.dtype}, {k.dtype}, {v.dtype}")


def check_inputs(q, k, v, config: PrefixConfig):
    """Shape / dtype checks of `prefix_attention` (clear errors, nothing silently converted)."""
    check_qkv(q, k, v, "prefix_attention")
    d = q.shape[-1]
    if config.smem_bytes(d) > SMEM_LIMIT:
        raise ValueError(
            f"{config} needs {config.smem_bytes(d)} bytes of shared memory for head_dim {d}, "
            f"more than the {SMEM_LIMIT} an sm_90 CTA has; lower stages or block_kv"
        )


def prefix_attention(
    q, k, v, kv_len, *, scale: float | None = None, config: PrefixConfig | None = None, interpret: bool = False
):
    """Attention of every query over keys `[0, kv_len)` of `k, v`.

    Args:
      q: `[B, Lq, H, D]`, bfloat16 or float16, D in {64, 128}.
      k, v: `[B, S, H, D]`, q's dtype (e.g. one layer's KV-cache buffer).
      kv_len: valid keys, a Python int or traced int32 scalar in [1, S] (not checked when
        traced: a length past S reads zeros there as keys, which then count).
      scale: score scale, default `D ** -0.5`.
      config: tiling (`PrefixConfig`).
      interpret: run in Pallas' GPU interpret mode (CPU; slow, for tests).
    Returns:
      `[B, Lq, H, D]` in q's dtype.
    """
    config = PrefixConfig() if config is None else config
    check_inputs(q, k, v, config)
    if isinstance(kv_len, int) and not 1 <= kv_len <= k.shape[1]:
        raise ValueError(f"kv_len must be in [1, {k.shape[1]}], got {kv_len}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"prefix_attention needs a positive score scale, got {scale}")
    lens = jnp.reshape(jnp.asarray(kv_len, jnp.int32), (1,))
    return _prefix_attention(q, k, v, lens, scale=scale, config=config, interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def _prefix_attention(q, k, v, lens, *, scale, config, interpret):
    lq = q.shape[1]  # padded keys lie past kv_len (masked), padded query rows are sliced off
    out, lse = _call_kernel(pad_rows(q), pad_rows(k), pad_rows(v), lens, scale, config, interpret)
    if config.splits == 1:
        return out[0, :, :lq]
    return merge_splits(out[:, :, :lq], lse[..., :lq])


def pad_rows(x):
    """`x [B, L, H, D]` with L padded by zeros to a multiple of `ROW_ALIGN` (a copy only when
    L is not one already: Mosaic GPU's TMA descriptors of the (8, 64)-tiled copies need it)."""
    extra = -x.shape[1] % ROW_ALIGN
    return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


def merge_splits(out, lse):
    """Merge partial attention outputs over disjoint key ranges.

    out: `[P, B, Lq, H, D]`, each normalised over its own keys; lse: `[P, B, H, Lq]` float32
    natural-log sum of exp of its scores (-inf for a range with no keys). Returns `[B, Lq, H, D]`.
    """
    lse = jnp.transpose(lse, (0, 1, 3, 2))[..., None]  # [P, B, Lq, H, 1]
    top = jnp.max(lse, axis=0)
    w = jnp.exp(lse - top)
    o = jnp.sum(jnp.where(w > 0, out.astype(jnp.float32), 0.0) * w, axis=0) / jnp.sum(w, axis=0)
    return o.astype(out.dtype)


def _call_kernel(q, k, v, lens, scale, cfg: PrefixConfig, interpret: bool):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    batch, q_len, heads, head_dim = q.shape
    dtype = q.dtype
    bq, bkv, stages, splits = cfg.block_q, cfg.block_kv, cfg.stages, cfg.splits
    q_tiles = pl.cdiv(q_len, 2 * bq)
    c = scale * LOG2E  # scores in log2 units: exp(s * scale) = exp2(s * c)

    def kernel(lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (qo_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        head = lax.axis_index("heads")
        q_tile = lax.axis_index("q_tiles")
        part = lax.axis_index("parts")
        b = lax.div(part, jnp.int32(splits))
        split = lax.rem(part, jnp.int32(splits))
        wg = lax.axis_index("wg")

        # This CTA's key tiles: its split's share of cdiv(kv_len, bkv); all but the tile that
        # straddles kv_len run unmasked.
        kv_len = lens_ref[0]
        tiles = lax.div(kv_len + (bkv - 1), jnp.int32(bkv))
        per = lax.div(tiles + (splits - 1), jnp.int32(splits))
        lo = split * per
        steps = jnp.maximum(jnp.minimum(lo + per, tiles) - lo, 0)
        unmasked = jnp.minimum(jnp.maximum(lax.div(kv_len, jnp.int32(bkv)) - lo, 0), steps)

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def ping():
            if cfg.schedule_barrier:
                take_turn()

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(232, action="increase")
            qo_smem = qo_smem2.at[wg]
            row0 = q_tile * (2 * bq) + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), head], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])

            m_i = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bq, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            if cfg.schedule_barrier:
                pl.when(wg == 1)(take_turn)

            def step(i, carry, masked: bool):
                acc, m_i, l_i = carry
                slot = lax.rem(i, jnp.int32(stages))

                def qk_scope(s_ref):
                    plgpu.wgmma(s_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    ping()
                    return s_ref[...]

                s = pl.run_scoped(qk_scope, plgpu.ACC((bq, bkv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    key = plgpu.broadcasted_iota(jnp.int32, (bq, bkv), 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(key + (lo + i) * bkv < kv_len, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1) * c)
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                if cfg.schedule_barrier:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                if cfg.schedule_barrier:
                    plgpu.barrier_wait(turn)

                def wait_next_k():
                    nxt = i + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(stages))])

                if interpret:  # the interpreter's wgmma takes no register operand
                    pv = jnp.dot(p16, v_smem.at[slot][...], preferred_element_type=jnp.float32)
                    wait_next_k()
                    acc = acc + pv
                else:

                    def pv_state(acc_ref):
                        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                        wait_next_k()

                    acc = pl.run_state(pv_state)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), (acc, m_i, l_i))
            acc, m_i, l_i = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)
            if cfg.schedule_barrier:
                pl.when(wg == 0)(take_turn)

            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)  # an empty split writes zeros
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            if lse_smem2 is not None:
                lse_smem2.at[wg][...] = m_i * LN2 + jnp.log(l_i)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[split, b, pl.ds(row0, bq), head])
            if lse_smem2 is not None:
                plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[split, b, head, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _producer():
            plgpu.set_max_registers(40, action="decrease")

            def load(t, slot):
                rows = (b, pl.ds((lo + t) * bkv, bkv), head)
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            for t in range(stages):
                pl.when(t < steps)(functools.partial(load, t, t))

            def refill(j, _):
                slot = lax.rem(j, jnp.int32(stages))
                rows = (b, pl.ds((lo + j + stages) * bkv, bkv), head)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

            lax.fori_loop(0, jnp.maximum(steps - stages, 0), refill, None)

            def drain(t, _):  # see the last tiles released, so every barrier phase is observed
                slot = lax.rem(t, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

            lax.fori_loop(jnp.maximum(steps - stages, 0), steps, drain, None)

    def crm_prefix_attention(lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):  # the kernel's name in traces
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [
            plgpu.SMEM((2, bq, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((stages, bkv, head_dim), dtype, transforms=tiled),
            plgpu.SMEM((2, bq), jnp.float32) if splits > 1 else None,
        ]
        pl.run_scoped(
            lambda *scoped: kernel(lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    rows = q_tiles * 2 * bq  # whole tiles: no store runs past the arrays
    out_type = [
        jax.ShapeDtypeStruct((splits, batch, rows, heads, head_dim), dtype),
        jax.ShapeDtypeStruct((splits, batch, heads, rows), jnp.float32) if splits > 1 else None,
    ]
    kw = {}
    if interpret:
        kw["interpret"] = plgpu.InterpretGPUParams()
    out, lse = plgpu.kernel(
        crm_prefix_attention,
        out_type=out_type,
        grid=(heads, q_tiles, batch * splits),
        grid_names=("heads", "q_tiles", "parts"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(lens, q, k, v)
    return out, lse


def prefix_attention_reference(q, k, v, kv_len, *, scale: float | None = None):
    """float32 `[B, Lq, H, D]` attention of q `[B, Lq, H, D]` over keys `[0, kv_len)` of k, v
    `[B, S, H, D]`: `reference.attention_reference` with `kv_valid_len=kv_len` on float32 inputs."""
    qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
    return attention_reference(qf, kf, vf, scale=scale, kv_valid_len=kv_len)
