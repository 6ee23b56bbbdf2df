"""Public attention op: `attention(q, k, v, spec, ...)`.

Layout: q `[B, Lq, H, D]`, k and v `[B, Lk, H, D]`, output `[B, Lq, H, D]`.

Backends (`impl`):
  * ``xla``: `pallas_kernels.reference` (materialises scores; CPU, tests, tiny models).
  * ``auto``: ``xla`` on CPU.

Automatic differentiation (`ad`): ``vjp`` (reverse mode, for `jax.grad`) or
``jvp`` (forward mode, for `jax.jvp`). The XLA backend supports both in either
mode.
"""

from __future__ import annotations

from pallas_kernels.masks import MaskSpec
from pallas_kernels.reference import attention_reference, check_qkv

IMPLS = ("auto", "xla")
AD_MODES = ("vjp", "jvp")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    return "xla" if impl == "auto" else impl


def attention(q, k, v, spec: MaskSpec, *, scale: float | None = None, impl: str = "auto",
              ad: str = "vjp"):
    """Masked multi-head attention. See the module docstring for layout and modes."""
    check_qkv(q, k, v, spec)
    if ad not in AD_MODES:
        raise ValueError(f"attention ad mode must be one of {AD_MODES}, got {ad!r}")
    resolve_impl(impl)
    return attention_reference(q, k, v, spec, scale=scale)
