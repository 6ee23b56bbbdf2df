"""Public attention op: `attention(q, k, v, spec, ...)`.

Layout: q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`, output `[B, Lq, H, D]`.

Backends (`impl`):
  * ``xla``: `pallas_kernels.reference` (materialises the scores; CPU, tests, tiny models).
  * ``triton``: the Pallas block-sparse flash kernels of `pallas_kernels.triton`
    (GPU; on CPU only with ``interpret=True``, which is how the tests run them).
  * ``mosaic``: the Pallas Mosaic-TPU kernels of `pallas_kernels.mosaic` (same
    schedules and AD wiring). Tested only in Pallas TPU interpret mode on CPU
    (``interpret=True``; ``interpret="generic"`` uses the faster generic
    interpreter); never compiled on a TPU here, hence not chosen by ``auto``.
  * ``cudnn``: `jax.nn.dot_product_attention(implementation="cudnn")`, full masks
    only, reverse mode only (a baseline for benchmarks; JAX cannot jvp through it).
  * ``auto``: ``triton`` on GPU, ``xla`` on CPU and TPU.
    On GPU there is never a silent fallback: inputs the kernels cannot take
    (head_dim not in {64, 128}, mixed dtypes) raise a ValueError naming ``impl="xla"``.

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

Sharding: `pallas_call` has no sharding rule; use `attention_sharded` to run the
op under `jax.shard_map` over the batch and head axes of a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.masks import MaskSpec
from pallas_kernels.reference import attention_reference, check_qkv
from pallas_kernels import mosaic as _mosaic
from pallas_kernels.mosaic import MosaicConfig
from pallas_kernels.triton import flash as _flash
from pallas_kernels.triton.flash import FlashConfig, SUPPORTED_HEAD_DIMS, Tiles


def _kernels(impl):
    """(forward, backward, jvp) kernel entry points of a Pallas backend."""
    if impl == "triton":
        return _flash.flash_forward, _flash.flash_backward, _flash.flash_jvp
    return _mosaic.mosaic_forward, _mosaic.mosaic_backward, _mosaic.mosaic_jvp

IMPLS = ("auto", "xla", "triton", "mosaic", "cudnn")
AD_MODES = ("vjp", "jvp")


def resolve_impl(impl: str, interpret: bool = False) -> str:
    """Map ``auto`` to a concrete backend; validate the name and its platform."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    backend = jax.default_backend()
    if impl == "auto":
        return "triton" if backend == "gpu" else "xla"
    if impl == "triton" and backend != "gpu" and not interpret:
        raise ValueError(
            f"impl='triton' needs a GPU (default backend is {backend!r}); pass interpret=True "
            "to run the kernels in Pallas interpret mode, or use impl='xla'")
    if impl == "mosaic" and backend != "tpu" and not interpret:
        raise ValueError(
            f"impl='mosaic' needs a TPU (default backend is {backend!r}); pass interpret=True "
            "to run the kernels in Pallas TPU interpret mode, or use impl='xla'")
    return impl


def _check_kernel_inputs(q, k, v):
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"the triton attention kernels support head_dim in {SUPPORTED_HEAD_DIMS}, got {d}; "
            "use impl='xla' explicitly for other head dims (slow, materialises scores)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float32):
        raise ValueError(
            "the triton attention kernels need q, k, v of one dtype, bfloat16 or float32; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}")


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
    return _kernels(impl)[1](q, k, v, o, lse, do, spec, scale=scale, config=config,
                             interpret=interpret)


_attn_vjp.defvjp(_attn_vjp_fwd, _attn_vjp_bwd)


# ----------------------------------------------------------------------------- jvp op
def _is_linearizing(x) -> bool:
    """True when `x` is being partially evaluated (jax.grad / vjp / linearize)."""
    from jax._src.interpreters import partial_eval as pe
    return isinstance(x, pe.JaxprTracer)


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
    if any(t is not None and _is_linearizing(t) for t in (tq, tk, tv)):
        raise ValueError(
            "attention(..., ad='jvp') supports forward mode (jax.jvp) only: its JVP kernel has "
            "no transpose, so jax.grad / jax.vjp / jax.linearize cannot go through it. Use "
            "ad='vjp' for gradients (or impl='xla' on small inputs).")
    o, to, _ = _kernels(impl)[2](q, k, v, tq, tk, tv, spec, scale=scale, config=config,
                                 interpret=interpret)
    return o, to


_attn_jvp.defjvp(_attn_jvp_rule, symbolic_zeros=True)


# ----------------------------------------------------------------------------- public
def attention(q, k, v, spec: MaskSpec, *, scale: float | None = None, impl: str = "auto",
              ad: str = "vjp", interpret: bool | str = False,
              config: FlashConfig | MosaicConfig | None = None):
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
        `triton.default_config(dtype)`; `MosaicConfig` for mosaic).
    Returns:
      `[B, Lq, H, D]` in q's dtype.
    """
    check_qkv(q, k, v, spec)
    if ad not in AD_MODES:
        raise ValueError(f"attention ad mode must be one of {AD_MODES}, got {ad!r}")
    impl = resolve_impl(impl, interpret)
    if impl == "xla":
        return attention_reference(q, k, v, spec, scale=scale)
    if impl == "cudnn":
        if spec.kind != "full" or ad != "vjp":
            raise ValueError("impl='cudnn' is a baseline for full masks in reverse mode only; "
                             f"got kind={spec.kind!r}, ad={ad!r} (use impl='triton')")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    _check_kernel_inputs(q, k, v)
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


def attention_sharded(q, k, v, spec: MaskSpec, mesh: jax.sharding.Mesh, *,
                      batch_axis: str | tuple[str, ...] | None = None,
                      head_axis: str | tuple[str, ...] | None = None, **kwargs):
    """`attention` under `jax.shard_map`, split over batch and/or heads.

    q, k, v `[B, L, H, D]` are partitioned as `P(batch_axis, None, head_axis, None)`
    on `mesh` (B divisible by the batch axes' size, H by the head axes' size); each
    shard runs the kernels on its local `[B/nb, L, H/nh, D]` block (the mask does
    not depend on batch or head, so the spec is unchanged). Other mesh axes are
    replicated. kwargs go to `attention` (scale, impl, ad, interpret, config).
    """
    spec_p = P(batch_axis, None, head_axis, None)
    fn = functools.partial(attention, spec=spec, **kwargs)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec_p, spec_p, spec_p), out_specs=spec_p,
                         check_vma=False)(q, k, v)


__all__ = ["attention", "attention_sharded", "MaskSpec", "IMPLS", "AD_MODES", "resolve_impl",
           "FlashConfig", "Tiles", "MosaicConfig"]
