"""Meshes and shardings: data-parallel batches, FSDP-sharded parameters.

Mesh axes are ("data", "fsdp"). The batch's leading axis is split over both
(every device sees different samples); each parameter is split along one of its
axes over "fsdp" (FSDP / ZeRO-3 style: XLA all-gathers it where it is used) and
replicated over "data". The axis is chosen by a logical rule: the largest axis
divisible by the fsdp size, never the stacked-layer axis of scanned blocks.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `data * fsdp` devices (default: the first ones)."""
    devices = jax.devices() if devices is None else devices
    if data < 1 or fsdp < 1:
        raise ValueError(f"mesh sizes must be >= 1, got data={data}, fsdp={fsdp}")
    if data * fsdp > len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, only {len(devices)} present")
    return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data x fsdp = {n} devices")


def _param_spec(path, shape, fsdp: int) -> P:
    stacked = any(getattr(k, "key", None) == "blocks" for k in path)
    best, best_size = None, 0
    for ax, n in enumerate(shape):
        if stacked and ax == 0:
            continue
        if n % fsdp == 0 and n > best_size:
            best, best_size = ax, n
    if fsdp == 1 or best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def param_shardings(params, mesh: Mesh):
    """NamedSharding per parameter leaf (FSDP over the mesh's "fsdp" axis)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _param_spec(path, x.shape, fsdp)), params)


def batch_shardings(batch, mesh: Mesh, batch_size: int):
    """Leading-axis data parallelism for every leaf whose first axis is the batch."""
    check_batch(batch_size, mesh)

    def one(x):
        if x is None:
            return None
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == batch_size:
            return NamedSharding(mesh, P(BATCH_AXES))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, batch)


def replicated(tree, mesh: Mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def state_shardings(state, mesh: Mesh):
    """Shardings of a TrainState: parameter-shaped trees FSDP, scalars replicated.

    Optimizer moments mirror the parameters' shapes, so the same per-shape rule
    shards them like the parameters they belong to.
    """
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        if getattr(x, "ndim", 0) == 0:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, _param_spec(path, x.shape, fsdp))

    return jax.tree_util.tree_map_with_path(one, state)
