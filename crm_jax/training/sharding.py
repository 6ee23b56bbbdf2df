"""Meshes and shardings: data-parallel batches, FSDP-sharded parameters, context parallelism.

Mesh axes are ("data", "fsdp", "context"). The batch's leading axis is split over
"data" and "fsdp" (every device of a context group sees the same samples); each
parameter is split along one of its axes over "fsdp" (FSDP / ZeRO-3 style: XLA
all-gathers it where it is used) and replicated over "data" and "context". The
axis is chosen by a logical rule: the largest axis divisible by the fsdp size,
never the stacked-layer axis of scanned blocks. "context" splits every frame's
tokens inside the model (`crm_jax.models.partitioning`: Ulysses attention), which
sees the mesh because `jit_step` traces the step under `jax.set_mesh`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crm_jax.distributed import ClusterError, local_batch_size, process_rows
from crm_jax.models.partitioning import BATCH_AXES, MESH_AXES


def make_mesh(data: int = 1, fsdp: int = 1, context: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp", "context") mesh over `data * fsdp * context` devices (default: the first ones).

    "context" is the innermost axis, so a context group is made of neighbouring
    devices (one host's NVLink domain) and its all-to-alls stay local.
    """
    if devices is None:  # each process's devices next to each other (stable within a process)
        devices = sorted(jax.devices(), key=lambda d: d.process_index)
    sizes = dict(data=data, fsdp=fsdp, context=context)
    if min(sizes.values()) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {sizes}")
    n = data * fsdp * context
    if n > len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x context={context} needs {n} devices, only {len(devices)} present"
        )
    if jax.process_count() > 1 and n != len(devices):
        raise ClusterError(
            f"mesh data={data} x fsdp={fsdp} x context={context} = {n} devices, but a "
            f"{jax.process_count()}-process run must use all {len(devices)} devices"
        )
    return Mesh(np.asarray(devices[:n]).reshape(data, fsdp, context), MESH_AXES)


def jit_step(fn, mesh: Mesh, in_shardings, out_shardings, donate_argnums=()):
    """`jax.jit(fn)` with fixed shardings, traced and run under `jax.set_mesh(mesh)`.

    The mesh context is what lets the model split tokens over "context" and run the
    attention kernels under `shard_map` (see `crm_jax.models.partitioning`).
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)

    @functools.wraps(fn)
    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    run.jitted = jitted
    return run


def check_batch(batch_size: int, mesh: Mesh) -> None:
    """Raise unless `batch_size` splits over the mesh's data x fsdp devices and, with several
    processes, each process's devices hold exactly its rows `distributed.process_rows`."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the mesh's data x fsdp = {n} devices")
    if jax.process_count() == 1:
        return
    local = local_batch_size(batch_size)
    held = NamedSharding(mesh, P(BATCH_AXES)).addressable_devices_indices_map((batch_size,))
    rows = sorted({(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop) for i in held.values()})
    lo, hi = process_rows(batch_size)
    if rows[0][0] != lo or rows[-1][1] != hi or sum(b - a for a, b in rows) != local:
        raise ClusterError(
            f"process {jax.process_index()} of {jax.process_count()} owns rows [{lo}, {hi}) of "
            f"the batch of {batch_size}, but its devices hold rows {rows} of the mesh "
            f"data={mesh.shape['data']} x fsdp={n // mesh.shape['data']}: data x fsdp must be a "
            f"multiple of the process count"
        )


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
        lambda path, x: NamedSharding(mesh, _param_spec(path, x.shape, fsdp)), params
    )


def batch_shardings(batch, mesh: Mesh, batch_size: int):
    """Leading-axis data parallelism for every leaf whose first axis is the batch.

    `batch` is this process's part (`batch_size // process_count` rows of every batch leaf,
    from the data sources); `batch_size` is the global batch size."""
    check_batch(batch_size, mesh)
    local = local_batch_size(batch_size)

    def one(x):
        if x is None:
            return None
        if getattr(x, "ndim", 0) >= 1 and x.shape[0] == local:
            return NamedSharding(mesh, P(BATCH_AXES))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, batch)


def global_batch(local, shardings, batch_size: int):
    """The global batch (arrays of `batch_size` rows, placed by `shardings`) from this process's
    rows `local` (leaves `[batch_size // process_count, ...]`, or whole for replicated leaves).

    Built with `jax.make_array_from_process_local_data`, each process giving only its rows
    `distributed.process_rows(batch_size)`; one process: `jax.device_put`."""
    if jax.process_count() == 1:
        return jax.device_put(local, shardings)

    def one(x, sh):
        if x is None:
            return None
        x = np.asarray(x)
        shape = (batch_size, *x.shape[1:]) if sh.spec and sh.spec[0] is not None else x.shape
        return jax.make_array_from_process_local_data(sh, x, shape)

    return jax.tree.map(one, local, shardings)


def global_put(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works when the shardings span several
    processes: every process passes the same full values (parameters, PRNG keys), and each
    places the parts its devices hold (`jax.make_array_from_process_local_data`)."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sh):
        if x is None:
            return None
        if (isinstance(x, jax.Array) and not x.is_fully_addressable) or sh.memory_kind == "pinned_host":
            return jax.device_put(x, sh)  # already global / host memory: jax checks and places it
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys: through their raw data
            data = np.asarray(jax.random.key_data(x))
            data_sh = NamedSharding(sh.mesh, P(*sh.spec, *([None] * (data.ndim - len(sh.spec)))))
            return jax.random.wrap_key_data(
                jax.make_array_from_process_local_data(data_sh, data, data.shape), impl=jax.random.key_impl(x)
            )
        return jax.make_array_from_process_local_data(sh, np.asarray(x), x.shape)

    return jax.tree.map(one, tree, shardings)


def replicated(tree, mesh: Mesh):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


OFFLOADABLE = ("ema", "teacher", "dmd_teacher")


def state_shardings(state, mesh: Mesh, offload: tuple[str, ...] = ()):
    """Shardings of a TrainState (or `Frozen`): parameter-shaped trees FSDP, scalars replicated.

    Optimizer moments mirror the parameters' shapes, so the same per-shape rule
    shards them like the parameters they belong to. Fields named in `offload`
    (of `OFFLOADABLE`: the EMA, the frozen teachers) are kept in pinned host memory
    between steps (same partitioning); `offload.make_step` splits the step so that they
    come to the device only in jits of their own (teacher pass, EMA update), trading
    host<->device copies per step for their device memory during the main step.
    """
    bad = set(offload) - set(OFFLOADABLE)
    if bad:
        raise ValueError(f"cannot offload {sorted(bad)}; offloadable fields: {OFFLOADABLE}")
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        if getattr(x, "ndim", 0) == 0:
            return NamedSharding(mesh, P())
        field = getattr(path[0], "name", None) if path else None
        kind = "pinned_host" if field in offload else None
        return NamedSharding(mesh, _param_spec(path, x.shape, fsdp), memory_kind=kind)

    return jax.tree_util.tree_map_with_path(one, state)
