"""The training batches a config names: the on-the-fly toy world or a generated dataset directory.

`make_source(c, mcfg)` is the source factory the entry points hand to `training.loop.train`.
"""

from __future__ import annotations

import jax

from crm_jax.data import toy_world as tw
from crm_jax.data.toy_source import ToySource
from crm_jax.models.config import WanConfig

WORLD_KEYS = ("num_frames", "height", "width", "num_sprites", "sprite_size", "action_speed", "max_speed")


def toy_world_config(c) -> tw.ToyWorldConfig:
    """The toy world of a config's `data` block."""
    return tw.ToyWorldConfig(**{k: c.data[k] for k in WORLD_KEYS if k in c.data})


def make_source(c, mcfg: WanConfig):
    """The training batches of config `c` for a model of config `mcfg` (checks the latent shape)."""
    if c.data.kind == "dataset":
        from crm_jax.data.dataset import DatasetSource

        src = DatasetSource(c.data.path, c.data.batch_size, seed=c.data.seed, mcfg=mcfg)
        want = c.data.get("latent_shape")
        have = tuple(src.meta["features"]["latents"]["shape"])
        if want and tuple(want) != have:
            raise ValueError(
                f"data.latent_shape={tuple(want)} but the dataset {c.data.path!r} holds latents "
                f"of shape {have}: set --config.data.latent_shape={','.join(map(str, have))}"
            )
        return src
    if c.data.kind != "toy":
        raise ValueError(f"unknown data.kind {c.data.kind!r} (known: 'toy', 'dataset')")
    src = ToySource(
        toy_world_config(c),
        c.data.batch_size,
        mcfg.text_len,
        mcfg.text_dim,
        seed=c.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if src.latent_shape[-1] != mcfg.in_channels:
        raise ValueError(
            f"toy latents have {src.latent_shape[-1]} channels but the model expects in_channels={mcfg.in_channels}"
        )
    return src
