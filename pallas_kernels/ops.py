"""Public attention op: `attention(q, k, v, spec, ...)`.

Layout: q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`, output `[B, Lq, H, D]`.

Backends (`impl`):
  * ``xla``: `pallas_kernels.reference` (materialises the scores; CPU, tests, tiny models).
  * ``triton``: the Pallas block-sparse flash kernels of `pallas_kernels.triton`
    (GPU; on CPU only with ``interpret=True``, which is how the tests run them).
  * ``mosaic``: the Pallas Mosaic-TPU kernels of `pallas_kernels.mosaic` (same
    schedules and AD wiring). Compiled for v4, v5e, v5p and v6e chips in the tests
    (ahead of time, from a CPU host, `tests/test_tpu_compile.py`); numerics tested in
    Pallas TPU interpret mode (``interpret=True``; ``interpret="generic"`` uses the
    faster generic interpreter).
  * ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")`, unmasked
    calls only (`unmasked(spec)`), reverse mode only (JAX cannot jvp through it).
  * ``auto``: ``mosaic`` on TPU, ``triton`` on GPU, ``xla`` on CPU -- except that on
    GPU an unmasked call (every query sees every key: ``full``, cross-attention, and the
    last block of a block-causal KV-cache call) in reverse mode (``ad="vjp"``) with
    bf16/fp16 inputs and head_dim 64 or 128 goes to ``cudnn``, which is faster there
    (H200, 32,760 tokens: 12.3 vs 15.9 ms forward, 43.9 vs 60.5 ms forward+backward).
    Masked calls and forward-mode (``ad="jvp"``) calls always run our kernels.
    On an accelerator ``auto`` never picks the dense reference: inputs the kernels
    cannot take (head_dim not in {64, 128}, mixed dtypes) raise a ValueError naming
    ``impl="xla"``, the explicit opt-in.

The platform is JAX's default backend, or the one set by `target_platform` (ahead-of-time
compilation for TPU chips from a CPU host).

Automatic differentiation (`ad`), for the ``triton`` backend:
  * ``vjp``: a `jax.custom_vjp` op: forward kernel (saving O and the log-sum-exp),
    backward kernels for dQ, dK, dV. `jax.grad` works; `jax.jvp` raises JAX's
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function" error.
  * ``jvp``: a `jax.custom_jvp` op whose rule runs the one-pass JVP kernel
    (returns O and its tangent). Tangents that are symbolic zeros (e.g. keys and
    values from a KV cache, stop-gradiented inputs) are skipped inside the kernel.
    `jax.grad` / `jax.vjp` through it raise a ValueError (the kernel has no
    transpose) instead of running anything slow.
The XLA backend supports both AD modes in either setting.

KV-cache buffers: `attention_kv_prefix(q, k, v, kv_len)` attends to the first `kv_len`
keys of a longer buffer without slicing it (on Hopper GPUs our Mosaic-GPU kernel
`pallas_kernels.mgpu`, ``impl="mgpu"``; cuDNN `key_value_seq_lengths`; a masked XLA
reference; or the Triton kernels with a static `prefix_spec`); `kv_len` may be traced on
the mgpu, cuDNN and XLA backends.

Sharding: `pallas_call` has no sharding rule; `attention_sharded` runs the op under
`jax.shard_map` over the batch and head axes of a mesh, and over a context
(sequence) axis by DeepSpeed-Ulysses all-to-alls (or query-only splitting for
cross-attention).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pallas_kernels import mgpu as _mgpu
from pallas_kernels import mosaic as _mosaic
from pallas_kernels._jax_private import is_linearizing
from pallas_kernels.common import SUPPORTED_HEAD_DIMS
from pallas_kernels.masks import MaskSpec, allowed_pairs
from pallas_kernels.mosaic import MosaicConfig
from pallas_kernels.reference import attention_reference, check_qkv
from pallas_kernels.triton import flash as _flash
from pallas_kernels.triton.flash import FlashConfig, Tiles


def _kernels(impl):
    """(forward, backward, jvp) kernel entry points of a Pallas backend."""
    if impl == "triton":
        return _flash.flash_forward, _flash.flash_backward, _flash.flash_jvp
    return _mosaic.mosaic_forward, _mosaic.mosaic_backward, _mosaic.mosaic_jvp


IMPLS = ("auto", "xla", "triton", "mosaic", "cudnn")
AD_MODES = ("vjp", "jvp")
PLATFORMS = ("cpu", "gpu", "tpu")

_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Trace attention for `platform` ("cpu" | "gpu" | "tpu") instead of the default backend.

    Ahead-of-time compilation traces on a host whose default backend is not the target
    (e.g. compiling for TPU chips from a CPU machine): inside this context ``impl="auto"``
    and the platform checks of `resolve_impl` follow `platform`.
    """
    if platform not in PLATFORMS:
        raise ValueError(f"target platform must be one of {PLATFORMS}, got {platform!r}")
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
    """The platform attention is traced for: `target_platform`'s, else JAX's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def resolve_impl(impl: str, interpret: bool = False) -> str:
    """Map ``auto`` to a concrete backend; validate the name and its platform."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    backend = current_platform()
    if impl == "auto":
        return {"gpu": "triton", "tpu": "mosaic"}.get(backend, "xla")
    if impl == "triton" and backend != "gpu" and not interpret:
        raise ValueError(
            f"impl='triton' needs a GPU (the platform is {backend!r}); pass interpret=True "
            "to run the kernels in Pallas interpret mode, or use impl='xla'"
        )
    if impl == "mosaic" and backend != "tpu" and not interpret:
        raise ValueError(
            f"impl='mosaic' needs a TPU (the platform is {backend!r}); pass interpret=True "
            "to run the kernels in Pallas TPU interpret mode, trace under "
            "pallas_kernels.ops.target_platform('tpu') to compile for TPU chips ahead of time, "
            "or use impl='xla'"
        )
    return impl


def unmasked(spec: MaskSpec) -> bool:
    """Whether every query may attend to every key (the mask is all True)."""
    return spec.kind == "full" or _allowed_pairs(spec) == spec.q_len * spec.kv_len


@functools.lru_cache(maxsize=256)
def _allowed_pairs(spec: MaskSpec) -> int:
    return allowed_pairs(spec)


def _auto_cudnn(q, k, spec: MaskSpec, ad: str) -> bool:
    return (
        ad == "vjp"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype
        and q.shape[-1] in SUPPORTED_HEAD_DIMS
        and unmasked(spec)
    )


def _check_kernel_inputs(q, k, v, impl):
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"the {impl} attention kernels support head_dim in {SUPPORTED_HEAD_DIMS}, got {d}; "
            "use impl='xla' explicitly for other head dims (slow, materialises scores)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(
            f"the {impl} attention kernels need q, k, v of one dtype, bfloat16 or float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )


def kernel_config(impl: str, tiles: tuple[int, int], dtype=jnp.bfloat16) -> FlashConfig | MosaicConfig:
    """The kernel config of `impl` ("triton" | "mosaic") with tiles (block_q, block_k) on
    every kernel (forward, JVP, dQ, dK/dV); Triton keeps its default warps and stages."""
    bq, bk = (int(b) for b in tiles)
    if impl == "mosaic":
        return MosaicConfig.uniform(bq, bk)
    if impl == "triton":
        base = _flash.default_config(dtype)
        return FlashConfig(
            *(Tiles(bq, bk, t.num_warps, t.num_stages) for t in (base.fwd, base.jvp, base.dkdv, base.dq)),
            full_ranges=base.full_ranges,
        )
    raise ValueError(f"tiles apply to the 'triton' and 'mosaic' kernels, not impl={impl!r}")


# ----------------------------------------------------------------------------- vjp op
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attn_vjp(q, k, v, spec, scale, config, interpret, impl):
    o, _ = _kernels(impl)[0](q, k, v, spec, scale=scale, config=config, interpret=interpret)
    return o


def _attn_vjp_fwd(q, k, v, spec, scale, config, interpret, impl):
    o, lse = _kernels(impl)[0](q, k, v, spec, scale=scale, config=config, interpret=interpret)
    return o, (q, k, v, o, lse)


def _attn_vjp_bwd(spec, scale, config, interpret, impl, res, do):
    q, k, v, o, lse = res
    return _kernels(impl)[1](q, k, v, o, lse, do, spec, scale=scale, config=config, interpret=interpret)


_attn_vjp.defvjp(_attn_vjp_fwd, _attn_vjp_bwd)


# ----------------------------------------------------------------------------- jvp op
@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5, 6, 7))
def _attn_jvp(q, k, v, spec, scale, config, interpret, impl):
    o, _ = _kernels(impl)[0](q, k, v, spec, scale=scale, config=config, interpret=interpret)
    return o


def _attn_jvp_rule(spec, scale, config, interpret, impl, primals, tangents):
    q, k, v = primals

    def tan(t, ref):
        if isinstance(t, jax.custom_derivatives.SymbolicZero):
            return None
        return t.astype(ref.dtype)

    tq, tk, tv = (tan(t, x) for t, x in zip(tangents, primals))
    if tq is None and tk is None and tv is None:
        o = _attn_jvp(q, k, v, spec, scale, config, interpret, impl)
        return o, jnp.zeros_like(o)
    if any(t is not None and is_linearizing(t) for t in (tq, tk, tv)):
        raise ValueError(
            "attention(..., ad='jvp') supports forward mode (jax.jvp) only: its JVP kernel has "
            "no transpose, so jax.grad / jax.vjp / jax.linearize cannot go through it. Use "
            "ad='vjp' for gradients (or impl='xla' on small inputs)."
        )
    o, to, _ = _kernels(impl)[2](q, k, v, tq, tk, tv, spec, scale=scale, config=config, interpret=interpret)
    return o, to


_attn_jvp.defjvp(_attn_jvp_rule, symbolic_zeros=True)


# ----------------------------------------------------------------------------- public
def attention(
    q,
    k,
    v,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    impl: str = "auto",
    ad: str = "vjp",
    interpret: bool | str = False,
    config: FlashConfig | MosaicConfig | None = None,
    tiles: tuple[int, int] | None = None,
):
    """Masked multi-head attention.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]`.
      spec: the attention pattern (`masks.MaskSpec`); its lengths must equal Lq, Lk.
      scale: score scale, default `D ** -0.5`.
      impl: ``auto`` | ``xla`` | ``triton`` | ``mosaic`` (see module docstring).
      ad: ``vjp`` (reverse mode / jax.grad) or ``jvp`` (forward mode / jax.jvp).
      interpret: run the Pallas kernels in interpret mode (CPU tests); for ``mosaic``
        True is TPU interpret mode, "generic" the generic Pallas interpreter.
      config: kernel tile sizes (`FlashConfig` for triton, default
        `triton.default_config(dtype)`; `MosaicConfig` for mosaic, default
        `mosaic.default_config(Lq, Lk)`).
      tiles: (block_q, block_k) for every kernel of whichever backend runs (see
        `kernel_config`); instead of `config`. Ignored by ``xla`` and ``cudnn``.
    Returns:
      `[B, Lq, H, D]` in q's dtype.
    """
    check_qkv(q, k, v, spec)
    if ad not in AD_MODES:
        raise ValueError(f"attention ad mode must be one of {AD_MODES}, got {ad!r}")
    requested, impl = impl, resolve_impl(impl, interpret)
    if requested == "auto" and impl == "triton" and _auto_cudnn(q, k, spec, ad):
        impl = "cudnn"
    if tiles is not None and len(tuple(tiles)) != 2:
        raise ValueError(f"tiles must be (block_q, block_k), got {tiles!r}")
    if impl == "xla":
        return attention_reference(q, k, v, spec, scale=scale)
    if impl == "cudnn":
        if not unmasked(spec) or ad != "vjp":
            raise ValueError(
                "impl='cudnn' takes unmasked attention in reverse mode only; "
                f"got kind={spec.kind!r}, ad={ad!r} (use impl='triton')"
            )
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    _check_kernel_inputs(q, k, v, impl)
    if tiles is not None:
        if config is not None:
            raise ValueError("pass either config or tiles to attention, not both")
        config = kernel_config(impl, tiles, q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "triton":
        if config is not None and not isinstance(config, FlashConfig):
            raise ValueError(f"impl='triton' takes a FlashConfig, got {type(config).__name__}")
        interpret = bool(interpret)
    elif config is not None and not isinstance(config, MosaicConfig):
        raise ValueError(f"impl='mosaic' takes a MosaicConfig, got {type(config).__name__}")
    if ad == "vjp":
        return _attn_vjp(q, k, v, spec, scale, config, interpret, impl)
    return _attn_jvp(q, k, v, spec, scale, config, interpret, impl)


# ----------------------------------------------------------------------------- key prefix
def prefix_spec(q_len: int, kv_len: int, valid: int) -> MaskSpec:
    """A static `MaskSpec` in which every query sees exactly keys `[0, valid)` of `kv_len`.

    Block-causal over single tokens (tokens_per_frame = 1) with the queries as the block
    `[valid - q_len, valid)`: every key at or after `valid` lies in a later block and is
    masked, so the kernels skip its tiles. Needs `q_len <= valid <= kv_len`.
    """
    if not q_len <= valid <= kv_len:
        raise ValueError(f"prefix_spec needs q_len ({q_len}) <= valid ({valid}) <= kv_len ({kv_len})")
    first = valid - q_len if valid > q_len else q_len
    return MaskSpec("block_causal", q_len, kv_len, 1, first, q_len, q_offset=valid - q_len)


PREFIX_IMPLS = IMPLS + ("mgpu",)


def _is_hopper() -> bool:
    """Whether the default device is an sm_90 (Hopper: H100 / H200) GPU."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def prefix_impl(q, k, *, impl: str = "auto", ad: str = "vjp", interpret: bool | str = False) -> str:
    """The backend `attention_kv_prefix` runs for these inputs (``mgpu``, ``cudnn``, ``xla``,
    ``triton``, ``mosaic``).

    ``auto`` on a GPU, for unmasked-capable inputs (bf16/fp16, head_dim 64 or 128) in reverse
    mode: ``mgpu`` on Hopper, ``cudnn`` elsewhere; forward mode (``ad="jvp"``) runs the Triton
    kernels; TPU runs ``mosaic`` (a static `kv_len`), CPU ``xla``. ``mgpu`` asked for explicitly needs a Hopper GPU (or
    ``interpret=True``), reverse mode and inputs the kernel takes, or it raises.
    """
    if impl == "mgpu":
        if ad != "vjp":
            raise ValueError(
                "impl='mgpu' (a forward kernel; gradients via cuDNN) takes ad='vjp'; use impl='triton' for ad='jvp'"
            )
        if not interpret and not _is_hopper():
            raise ValueError(
                f"impl='mgpu' needs an sm_90 GPU (H100/H200), not {jax.devices()[0].device_kind!r}; "
                "pass interpret=True to run it in Pallas' GPU interpret mode, or use impl='cudnn'"
            )
        return "mgpu"
    requested, impl = impl, resolve_impl(impl, interpret)
    if requested == "auto" and impl == "triton" and _auto_cudnn(q, k, MaskSpec("full", q.shape[1], k.shape[1]), ad):
        impl = "mgpu" if _is_hopper() else "cudnn"
    return impl


def prefix_len_can_be_traced(q, k, *, impl: str = "auto", ad: str = "vjp", interpret: bool | str = False) -> bool:
    """Whether `attention_kv_prefix` accepts a traced `kv_len` for these inputs (mgpu, cuDNN or XLA)."""
    return prefix_impl(q, k, impl=impl, ad=ad, interpret=interpret) in ("xla", "cudnn", "mgpu")


def _cudnn_prefix(q, k, v, kv_len, scale):
    lens = jnp.full((q.shape[0],), kv_len, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lens, implementation="cudnn")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mgpu_prefix(q, k, v, kv_len, scale, config, interpret):
    return _mgpu.prefix_attention(q, k, v, kv_len, scale=scale, config=config, interpret=interpret)


def _mgpu_prefix_fwd(q, k, v, kv_len, scale, config, interpret):
    return _mgpu_prefix(q, k, v, kv_len, scale, config, interpret), (q, k, v, kv_len)


def _mgpu_prefix_bwd(scale, config, interpret, res, g):
    """The kernel is forward-only: gradients come from cuDNN's backward (after its own forward),
    or from the XLA reference in interpret mode (CPU)."""
    q, k, v, kv_len = res
    if interpret:
        fn = lambda q, k, v: attention_reference(q, k, v, scale=scale, kv_valid_len=kv_len)
    else:
        fn = lambda q, k, v: _cudnn_prefix(q, k, v, kv_len, scale)
    _, pull = jax.vjp(fn, q, k, v)
    return (*pull(g.astype(q.dtype)), None)


_mgpu_prefix.defvjp(_mgpu_prefix_fwd, _mgpu_prefix_bwd)


def attention_kv_prefix(
    q,
    k,
    v,
    kv_len,
    *,
    scale: float | None = None,
    impl: str = "auto",
    ad: str = "vjp",
    interpret: bool | str = False,
    config: FlashConfig | MosaicConfig | None = None,
    tiles: tuple[int, int] | None = None,
):
    """Attention in which every query sees keys `[0, kv_len)` of `k, v`; later keys are ignored.

    For a KV-cache buffer that already holds this call's keys: attending over the whole
    buffer with a valid length needs no copy of the valid part.

    Args:
      q: `[B, Lq, H, D]`; k, v: `[B, S, H, D]` (e.g. one layer's cache buffer).
      kv_len: valid keys, a Python int in [1, S] or a traced int32 scalar (then only the
        ``mgpu``, ``cudnn`` and ``xla`` backends apply; see `prefix_len_can_be_traced`).
      scale, impl, ad, interpret, config: as in `attention`, and ``impl="mgpu"``: our
        Hopper kernel (`pallas_kernels.mgpu.prefix_attention`, `config` a `PrefixConfig`;
        its gradient is cuDNN's). ``auto`` (see `prefix_impl`) picks it on Hopper where
        `attention` would pick cuDNN for an unmasked call, cuDNN (its
        `key_value_seq_lengths`; it skips the keys past the length) on other GPUs, the XLA
        reference (keys past the length masked) on CPU, and otherwise our Triton (GPU) or
        Mosaic (TPU) kernels with `prefix_spec` (static lengths).
    Returns:
      `[B, Lq, H, D]` in q's dtype. Keys past `kv_len` never contribute, whatever they hold
      (finite values; they are masked, not read as zeros).
    """
    check_qkv(q, k, v)
    if ad not in AD_MODES:
        raise ValueError(f"attention ad mode must be one of {AD_MODES}, got {ad!r}")
    static = isinstance(kv_len, (int, np.integer))
    s_len = k.shape[1]
    if static and not 1 <= int(kv_len) <= s_len:
        raise ValueError(f"kv_len must be in [1, {s_len}] (the keys given), got {kv_len}")
    impl = prefix_impl(q, k, impl=impl, ad=ad, interpret=interpret)
    if impl == "mgpu":
        if config is not None and not isinstance(config, _mgpu.PrefixConfig):
            raise ValueError(f"impl='mgpu' takes a PrefixConfig, got {type(config).__name__}")
        config = _mgpu.default_config(q.shape, k.shape) if config is None else config
        _mgpu.check_inputs(q, k, v, config)
        return _mgpu_prefix(
            q, k, v, jnp.asarray(kv_len, jnp.int32), None if scale is None else float(scale), config, bool(interpret)
        )
    if impl == "cudnn":
        if ad != "vjp":
            raise ValueError("impl='cudnn' takes reverse mode (ad='vjp') only; use impl='triton' for ad='jvp'")
        return _cudnn_prefix(q, k, v, kv_len, scale)
    if impl == "xla":
        if static:  # the same arithmetic as `attention` on exactly the valid keys
            kv_len = int(kv_len)
            return attention_reference(
                q, k[:, :kv_len], v[:, :kv_len], MaskSpec("full", q.shape[1], kv_len), scale=scale
            )
        return attention_reference(q, k, v, scale=scale, kv_valid_len=kv_len)
    if not static:
        raise ValueError(
            f"attention_kv_prefix with impl={impl!r} needs a static (Python int) kv_len: the kernels' "
            "tile schedule is built at trace time; traced lengths run on cuDNN (bf16/fp16, ad='vjp') "
            "or impl='xla'"
        )
    spec = prefix_spec(q.shape[1], s_len, int(kv_len))
    return attention(q, k, v, spec, scale=scale, impl=impl, ad=ad, interpret=interpret, config=config, tiles=tiles)


def attention_sharded(
    q,
    k,
    v,
    spec: MaskSpec,
    mesh: jax.sharding.Mesh | None = None,
    *,
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | tuple[str, ...] | None = None,
    context_axis: str | None = None,
    split_kv: bool = True,
    **kwargs,
):
    """`attention` under `jax.shard_map`: batch, head and context (sequence) parallel.

    Layouts: q `[B, Lq, H, D]`, k, v `[B, Lk, H, D]` (token order = the spec's), or
    frame-structured q `[B, Tq, N, H, D]`, k, v `[B, Tk, N, H, D]` (L = T * N, frame
    major; N = tokens per frame). The output has q's layout and sharding.

    Partitioning on `mesh` (default: the mesh set with `jax.set_mesh`): the batch over
    `batch_axis`, heads over `head_axis`, and with `context_axis` the token axis (L,
    or N for frame-structured inputs) over `context_axis`. The mask does not depend
    on batch or head, so those shards run `attention` unchanged. Context parallelism:
      * `split_kv=True` (self-attention; any mask): DeepSpeed-Ulysses. Inside the
        map an all-to-all makes each shard's tokens whole and splits its heads
        instead (q/k/v `[b, L, h / c, D]`), attention runs on full sequences, and a
        second all-to-all restores the token split. Under `jax.jvp` the tangents
        take the same all-to-alls; under `jax.grad` the cotangents the transposed
        ones. Needs the token axis and the local heads divisible by the context size.
      * `split_kv=False` (cross-attention): k and v are replicated over
        `context_axis` and each shard attends with its own queries only -- no
        communication. Valid only for `spec.kind == "full"` (the mask must not
        depend on the query position).
    kwargs go to `attention` (scale, impl, ad, interpret, config).
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        raise ValueError("attention_sharded needs a mesh: pass one or call it under jax.set_mesh(mesh)")
    if q.ndim not in (4, 5) or k.ndim != v.ndim or k.ndim not in (4, 5):
        raise ValueError(
            f"attention_sharded expects q [B, L, H, D] or [B, T, N, H, D] and k, v of "
            f"rank 4 or 5; got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}"
        )
    frames = q.ndim == 5
    tok_ax = 2 if frames else 1

    def axis_size(ax):
        names = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
        for name in names:
            if name not in mesh.axis_names:
                raise ValueError(f"mesh axis {name!r} is not in the mesh {mesh.axis_names}")
        return int(np.prod([mesh.shape[a] for a in names])) if names else 1

    nb, nh, nc = axis_size(batch_axis), axis_size(head_axis), axis_size(context_axis)
    if q.shape[0] % nb:
        raise ValueError(f"batch {q.shape[0]} is not divisible by the {nb} shards of {batch_axis!r}")
    if q.shape[-2] % nh:
        raise ValueError(f"{q.shape[-2]} heads are not divisible by the {nh} shards of {head_axis!r}")

    def pspec(x, ctx):
        s = [batch_axis] + [None] * (x.ndim - 1)
        s[-2] = head_axis
        if ctx:
            s[tok_ax] = context_axis
        return P(*s)

    def flat(x):
        return x.reshape(x.shape[0], -1, *x.shape[-2:]) if x.ndim == 5 else x

    fn = functools.partial(attention, **kwargs)
    if context_axis is None or nc == 1:

        def local(q, k, v):
            return fn(flat(q), flat(k), flat(v), spec).reshape(q.shape)

        kv_ctx = False
    elif split_kv:
        for name, x in (("q", q), ("k", k)):
            if x.shape[tok_ax] % nc:
                raise ValueError(
                    f"context parallelism: {name}'s token axis ({x.shape[tok_ax]}) is not "
                    f"divisible by the {nc} shards of {context_axis!r}"
                )
        if (q.shape[-2] // nh) % nc:
            raise ValueError(
                f"context parallelism (Ulysses) splits heads: {q.shape[-2] // nh} local heads "
                f"are not divisible by the {nc} shards of {context_axis!r}"
            )
        h_ax = q.ndim - 2

        def gather_tokens(x):  # [.., L/c or N/c, .., h, D] -> [.., L or N, .., h/c, D]
            return jax.lax.all_to_all(x, context_axis, h_ax, tok_ax, tiled=True)

        def local(q, k, v):
            o = fn(flat(gather_tokens(q)), flat(gather_tokens(k)), flat(gather_tokens(v)), spec)
            o = o.reshape(*q.shape[:tok_ax], q.shape[tok_ax] * nc, *q.shape[tok_ax + 1 : -2], -1, q.shape[-1])
            return jax.lax.all_to_all(o, context_axis, tok_ax, h_ax, tiled=True)

        kv_ctx = True
    else:
        if spec.kind != "full":
            raise ValueError(
                "context parallelism with split_kv=False (replicated k/v) needs a full mask "
                f"(cross-attention); got kind={spec.kind!r}"
            )
        if q.shape[tok_ax] % nc:
            raise ValueError(
                f"context parallelism: q's token axis ({q.shape[tok_ax]}) is not divisible by "
                f"the {nc} shards of {context_axis!r}"
            )

        def local(q, k, v):
            lq = flat(q)
            local_spec = spec.replace(q_len=lq.shape[1])
            return fn(lq, flat(k), flat(v), local_spec).reshape(q.shape)

        kv_ctx = False
    in_specs = (pspec(q, context_axis is not None), pspec(k, kv_ctx), pspec(v, kv_ctx))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=in_specs[0], check_vma=False)(q, k, v)


__all__ = [
    "attention",
    "attention_sharded",
    "attention_kv_prefix",
    "prefix_spec",
    "prefix_len_can_be_traced",
    "prefix_impl",
    "MaskSpec",
    "IMPLS",
    "PREFIX_IMPLS",
    "AD_MODES",
    "resolve_impl",
    "FlashConfig",
    "Tiles",
    "MosaicConfig",
    "kernel_config",
    "target_platform",
    "current_platform",
    "PLATFORMS",
]
