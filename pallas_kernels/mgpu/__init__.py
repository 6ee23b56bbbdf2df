"""Pallas Mosaic-GPU (Hopper, sm_90a) kernels: attention over a KV-cache prefix (streaming) and
block-sparse flash attention under a `MaskSpec` (forward with log-sum-exp, one-pass JVP, backward;
not yet run on a GPU)."""

from pallas_kernels.mgpu.flash import (
    BWD_CONFIG,
    JVP_CONFIG,
    HopperConfig,
    hopper_backward,
    hopper_bwd_schedule,
    hopper_forward,
    hopper_jvp,
    hopper_schedule,
)
from pallas_kernels.mgpu.prefix_attention import (
    PrefixConfig,
    check_inputs,
    default_config,
    merge_splits,
    prefix_attention,
    prefix_attention_reference,
)

__all__ = [
    "BWD_CONFIG",
    "JVP_CONFIG",
    "HopperConfig",
    "PrefixConfig",
    "check_inputs",
    "default_config",
    "hopper_backward",
    "hopper_bwd_schedule",
    "hopper_forward",
    "hopper_jvp",
    "hopper_schedule",
    "merge_splits",
    "prefix_attention",
    "prefix_attention_reference",
]
