"""Pallas Mosaic-GPU (Hopper, sm_90a) kernels: attention over a KV-cache prefix (streaming)."""

from pallas_kernels.mgpu.prefix_attention import (
    PrefixConfig,
    check_inputs,
    default_config,
    merge_splits,
    prefix_attention,
    prefix_attention_reference,
)

__all__ = [
    "PrefixConfig",
    "check_inputs",
    "default_config",
    "merge_splits",
    "prefix_attention",
    "prefix_attention_reference",
]
