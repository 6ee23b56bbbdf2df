"""Pallas Mosaic (TPU) flash-attention kernels; tested in TPU interpret mode only (see flash.py)."""

from pallas_kernels.mosaic.flash import (  # noqa: F401
    MosaicConfig,
    mosaic_backward,
    mosaic_forward,
    mosaic_jvp,
)
