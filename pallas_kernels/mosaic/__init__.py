"""Pallas Mosaic (TPU) flash-attention kernels: forward (+LSE), backward and JVP (see flash.py)."""

from pallas_kernels.mosaic.flash import (  # noqa: F401
    DEFAULT_BLOCK,
    MosaicConfig,
    default_config,
    mosaic_backward,
    mosaic_forward,
    mosaic_jvp,
)
