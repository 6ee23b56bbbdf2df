"""Synthetic toy dataset from a toy teacher: `python -m crm_jax.data.generate --config=configs/toy_generate.py
--config.teacher=DIR --out=DATASET_DIR` (add `--config.ode.save=True` for the ODE-init baseline).

For Wan: model.name="wan_1_3b", latent_shape=(21, 60, 104, 16), latent_dtype="bfloat16",
cond.kind="embeddings", cond.embeddings=FILE.npz (context [n, 512, 4096], prompts, negative_context).
"""

import ml_collections

from configs.base import toy_model


def get_config():
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(name="tiny", overrides=ml_collections.ConfigDict(toy_model())))
    c.teacher = ""  # teacher checkpoint directory (load_any)
    c.allow_random_teacher = False  # tests only
    c.seed = 0  # noise of sample i: fold_in(key(seed), i)
    c.num_samples = 256
    c.samples_per_shard = 64
    c.batch_size = 8  # per host, split over the local devices
    c.latent_shape = (8, 16, 16, 12)  # [T, H, W, C]: toy 32x32 frames, space-to-depth factor 2
    c.latent_dtype = "float32"

    c.cond = ml_collections.ConfigDict(
        dict(
            kind="toy_world",  # toy_world | toy_prompts | embeddings
            seed=1,  # toy world episodes of sample i: fold_in(key(seed), i)
            height=32,
            width=32,  # toy world frame size (prompt/action statistics only)
            prompt_file="",  # toy_prompts: lines "scene=1 color=3 [| up up ...]"
            embeddings="",
        )
    )  # embeddings: .npz with context [n, L, D], prompts, negative_context

    c.pattern = ml_collections.ConfigDict(dict(kind="full", block_frames=1, first_block_frames=None))
    c.pattern.first_block_frames = ml_collections.FieldReference(None, field_type=int)
    c.sampler = ml_collections.ConfigDict(dict(num_steps=20, shift=3.0, t_max=1.0, guidance=3.0))
    c.ode = ml_collections.ConfigDict(dict(save=False, num_steps=4, sigma_max=1600.0))
    return c
