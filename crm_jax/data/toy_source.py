"""On-the-fly training batches from the toy world (deterministic per step).

A batch for step `s` is drawn from `fold_in(key(seed), s)`, so the iterator's
whole state is the step number: a resumed run sees exactly the batches it
would have seen. The toy "text encoder" is a fixed random embedding table of
the prompt tokens (scene id, controlled-sprite colour), padded to `text_len`.

With several processes (`process_index`, `process_count`), `batch(step)` holds only this
process's rows `crm_jax.distributed.process_rows(batch_size)` of the global batch `step`
(bit-identical to those rows of the one-process batch), so B below is `batch_size // process_count`.

Batch layout (model conventions, channels last):
  latents [B, T, H/f, W/f, 3 f^2] in [-1, 1] (space-to-depth of the RGB frames)
  context [B, text_len, text_dim]
  actions [B, T] int32
  states  [B, T, N, 2] ground-truth sprite positions (for scoring)
  colors  [B, N] int32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from crm_jax.data import toy_world as tw
from crm_jax.data.toy_latents import frames_to_latents
from crm_jax.distributed import local_batch_size, process_rows

TEXT_TABLE_SEED = 1234


@dataclasses.dataclass(frozen=True)
class ToySource:
    world: tw.ToyWorldConfig
    batch_size: int
    text_len: int
    text_dim: int
    seed: int = 0
    factor: int = 2
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.text_len < tw.PROMPT_LEN:
            raise ValueError(f"text_len {self.text_len} < toy prompt length {tw.PROMPT_LEN}")
        local_batch_size(self.batch_size, self.process_count)
        process_rows(self.batch_size, self.process_index, self.process_count)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.factor
        return (self.world.num_frames, self.world.height // f, self.world.width // f, 3 * f * f)

    def text_table(self):
        key = jax.random.key(TEXT_TABLE_SEED)
        return jax.random.normal(key, (self.world.prompt_vocab_size, self.text_dim)) / self.text_dim**0.5

    def embed_prompt(self, tokens):
        """`[B, P]` prompt tokens -> context `[B, text_len, text_dim]`."""
        emb = self.text_table()[tokens]
        pad = self.text_len - tokens.shape[-1]
        return jnp.pad(emb, ((0, 0), (0, pad), (0, 0)))

    def negative_context(self):
        """The unconditional ("empty prompt") embedding `[text_len, text_dim]` used by CFG."""
        return jnp.zeros((self.text_len, self.text_dim))

    def batch(self, step: int) -> dict:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        rows = (
            None if self.process_count == 1 else process_rows(self.batch_size, self.process_index, self.process_count)
        )
        ep, frames = tw.sample_batch(key, self.batch_size, self.world, rows)
        return dict(
            latents=frames_to_latents(frames, self.factor),
            context=self.embed_prompt(ep.prompt),
            actions=ep.actions.astype(jnp.int32),
            states=ep.states,
            colors=ep.colors,
        )
