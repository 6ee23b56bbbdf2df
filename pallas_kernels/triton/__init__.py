"""Pallas flash-attention kernels for GPU (Triton lowering; `interpret=True` on CPU).

Entry points (all layouts `[B, L, H, D]`, see `flash.py`):
  * `flash_forward(q, k, v, spec, ...) -> (o, lse)`
  * `flash_backward(q, k, v, o, lse, do, spec, ...) -> (dq, dk, dv)`
  * `flash_jvp(q, k, v, tq, tk, tv, spec, ...) -> (o, to, lse)`
"""

from pallas_kernels.common import SUPPORTED_HEAD_DIMS, kernel_allowed  # noqa: F401
from pallas_kernels.triton.flash import (  # noqa: F401
    FlashConfig,
    Tiles,
    default_config,
    flash_backward,
    flash_forward,
    flash_jvp,
)
