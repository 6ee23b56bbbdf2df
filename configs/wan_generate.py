"""Synthetic Wan2.1 data from the converted teacher:

    python -m crm_jax.data.generate --config=configs/wan_generate.py --out=data/wan_synthetic

Inputs (checked before anything runs): config.teacher (converted DiT, default
checkpoints/wan_1_3b) and config.cond.embeddings (umT5 prompt embeddings, default
data/wan_prompts/embeddings.npz). See configs/base.py `WAN_PATHS` and the README.
"""

from configs.base import wan_generate_config


def get_config():
    return wan_generate_config()
