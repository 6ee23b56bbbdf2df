"""How the model's activations and attention are partitioned under a device mesh.

The model holds no mesh. When it is traced under `jax.set_mesh(mesh)` (the train
steps do this), it reads the mesh's axes and

  * splits the batch over the `BATCH_AXES` ("data", "fsdp") that the mesh has;
  * with a `CONTEXT_AXIS` ("context") of size > 1, splits every frame's tokens
    (the N axis of activations `[B, T, N, dim]`) over it -- context (sequence)
    parallelism -- and runs self-attention with DeepSpeed-Ulysses all-to-alls
    (heads split inside attention, tokens everywhere else) and cross-attention
    on the local queries against replicated text keys;
  * runs the attention kernels under `jax.shard_map` (`pallas_call` has no
    sharding rule of its own, so without this XLA would replicate it).

Without a mesh (or on a single device) all of this is the identity. Splitting N
rather than the flat token axis keeps frames whole, so every mask pattern
(teacher forcing, block-causal, KV cache) stays a local computation after the
all-to-all.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import masks
from pallas_kernels.ops import attention, attention_sharded

BATCH_AXES = ("data", "fsdp")
CONTEXT_AXIS = "context"
MESH_AXES = BATCH_AXES + (CONTEXT_AXIS,)


def active_axes():
    """(batch axes or None, context axis or None, mesh) of the mesh set by `jax.set_mesh`.

    Returns (None, None, None) without a mesh or on a single device.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None, None, None
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    context = CONTEXT_AXIS if mesh.shape.get(CONTEXT_AXIS, 1) > 1 else None
    return batch, context, mesh


def constrain_tokens(h: jax.Array) -> jax.Array:
    """Pin activations `[B, T, N, ...]` to (batch, -, context, ...) sharding under a mesh."""
    batch, context, mesh = active_axes()
    if mesh is None:
        return h
    return jax.lax.with_sharding_constraint(h, P(batch, None, context, *([None] * (h.ndim - 3))))


def attend(q, k, v, spec: masks.MaskSpec, *, cross: bool, **kwargs) -> jax.Array:
    """Attention on frame-structured tokens.

    q `[B, T, N, H, D]`; self-attention k, v `[B, Tk, N, H, D]`, cross-attention
    k, v `[B, Lk, H, D]`. Returns `[B, T, N, H, D]`. kwargs go to `ops.attention`.
    """
    batch, context, mesh = active_axes()
    if mesh is None:
        b, t, n, h, d = q.shape
        flat = lambda x: x.reshape(b, -1, h, d)
        return attention(flat(q), flat(k), flat(v), spec, **kwargs).reshape(q.shape)
    return attention_sharded(q, k, v, spec, mesh, batch_axis=batch, context_axis=context, split_kv=not cross, **kwargs)
