"""The embedded default: a tiny causal Wan on the synthetic toy world (no downloads)."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.mode = "forward_check"
    c.model = "tiny"
    c.seed = 0
    c.batch_size = 2
    c.num_frames = 6
    c.latent_hw = (8, 8)
    c.block_frames = 3
    c.first_block_frames = 3
    return c
