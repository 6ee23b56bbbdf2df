"""Multi-process (multi-host) runs: joining the JAX cluster, who owns which rows, who writes.

One process runs per host (a TPU VM, a GPU node, or one GPU each); all run the same
command. Rules every part of the program follows:

* **Rows**: :func:`process_rows` — of any ``n`` items split over ``P`` processes, process
  ``p`` owns the contiguous block ``[p * n // P, (p + 1) * n // P)``. A global training
  batch of ``B`` rows (``B`` divisible by ``P``) is assembled from these blocks
  (``sharding.global_batch``); the data sources (``ToySource``, ``DatasetSource``) read only
  their own block, and dataset generation writes its own block of shards.
* **Writing**: :func:`is_main_process` (process 0) alone writes logs, metrics, TensorBoard
  events, progress bars, samples, exports and the demo / study outputs. Orbax checkpoints
  are written and restored by every process together.
* **Agreement**: values that must be equal everywhere (the resume step) go through
  :func:`agree`, which stops the run with an error naming every process's value.

:func:`maybe_init_distributed` joins the cluster described by the environment (see there).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import numpy as np

INIT_TIMEOUT_ENV = "CRM_DIST_INIT_TIMEOUT"  # seconds to wait for every process to join
HEARTBEAT_TIMEOUT_ENV = "CRM_DIST_HEARTBEAT_TIMEOUT"  # seconds of silence before a process counts as dead


class ClusterError(ValueError):
    """A multi-process setup that cannot work (the message names the numbers involved)."""


def process_rows(n: int, process_index: int | None = None, process_count: int | None = None) -> tuple[int, int]:
    """``(lo, hi)``: the block ``[p * n // P, (p + 1) * n // P)`` of ``n`` items owned by process
    ``p`` of ``P`` (default: this process of JAX's). The blocks partition ``[0, n)`` in order."""
    p, count = _process(process_index, process_count)
    return n * p // count, n * (p + 1) // count


def local_batch_size(batch_size: int, process_count: int | None = None) -> int:
    """Rows of a global batch of ``batch_size`` that each process holds; raises
    :class:`ClusterError` unless ``batch_size`` divides evenly over the processes."""
    _, count = _process(0, process_count)
    if batch_size < 1 or batch_size % count:
        raise ClusterError(
            f"global batch size {batch_size} does not divide over {count} processes "
            f"(each process must hold the same number of rows)"
        )
    return batch_size // count


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    p, count = int(process_index), int(process_count)
    if not 0 <= p < count:
        raise ClusterError(f"process index {p} not in [0, {count})")
    return p, count


def is_main_process() -> bool:
    """True on process 0, the one process that writes logs and files."""
    import jax

    return jax.process_index() == 0


def log(*args, **kw) -> None:
    """`print` on process 0 only."""
    if is_main_process():
        print(*args, **kw)


def agree(value: int, what: str) -> int:
    """``value`` if it is the same integer on every process; otherwise :class:`ClusterError`
    listing each process's value. Single-process runs return it unchanged. Every process must call it."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64))).reshape(-1)
    if len(set(values.tolist())) > 1:
        raise ClusterError(
            f"processes disagree on {what}: " + ", ".join(f"process {p}: {int(v)}" for p, v in enumerate(values))
        )
    return value


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process (every process must call it)."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag)))).any())


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(tree):
    """A pytree of (possibly multi-process) arrays as full numpy values on every process
    (one all-gather; every process must call it). Single-process trees are returned as they are."""
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------- joining a cluster


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise ClusterError(f"{name} is not set (needed with JAX_COORDINATOR_ADDRESS)") from None
    except ValueError:
        raise ClusterError(f"{name}={env[name]!r} is not an integer") from None


def cluster_from_env(env: Mapping[str, str] = os.environ) -> dict | None:
    """The cluster this process belongs to, from its environment, or None (a single process).

    Returns ``{"launcher", "num_processes", "process_id", "coordinator"}`` (``None`` for a
    value JAX detects itself), checked in this order:

    * ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) with ``JAX_NUM_PROCESSES`` and
      ``JAX_PROCESS_ID``: explicit;
    * SLURM (``SLURM_NTASKS`` > 1, ``SLURM_PROCID``);
    * Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1, ``OMPI_COMM_WORLD_RANK``);
    * Cloud TPU VMs: more than one host in ``TPU_WORKER_HOSTNAMES`` (``TPU_WORKER_ID``), or a
      multi-slice job (``MEGASCALE_COORDINATOR_ADDRESS``).
    """
    if env.get("JAX_COORDINATOR_ADDRESS"):
        addr = env["JAX_COORDINATOR_ADDRESS"]
        n, pid = _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")
        if n < 1 or not 0 <= pid < n:
            raise ClusterError(f"JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={n})")
        if ":" not in addr:
            raise ClusterError(f"JAX_COORDINATOR_ADDRESS={addr!r} must be host:port")
        return dict(launcher="env", num_processes=n, process_id=pid, coordinator=addr)
    for launcher, size, rank in (
        ("slurm", "SLURM_NTASKS", "SLURM_PROCID"),
        ("openmpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
    ):
        if env.get(size, "1") not in ("", "1"):
            n = int(env[size])
            pid = int(env[rank]) if env.get(rank, "").isdigit() else None
            return dict(launcher=launcher, num_processes=n, process_id=pid, coordinator=None)
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        multislice = bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
        wid = env.get("TPU_WORKER_ID", "")
        return dict(
            launcher="cloud_tpu",
            num_processes=None if multislice else len(hosts),
            process_id=int(wid) if wid.isdigit() and not multislice else None,
            coordinator=None,
        )
    return None


def _timeout(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ClusterError(f"{name}={raw!r} must be a positive number of seconds")
    return int(raw)


def _wait_for_coordinator(address: str, timeout_s: int, process_id: int, n: int) -> None:
    """Raise :class:`ClusterError` unless a TCP connection to ``address`` opens within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"process {process_id} of {n}: coordinator {address} "
                    f"(JAX_COORDINATOR_ADDRESS) not reachable within {timeout_s} s "
                    f"({INIT_TIMEOUT_ENV}): {e}"
                ) from None
            time.sleep(0.2)


def maybe_init_distributed(env: Mapping[str, str] = os.environ) -> bool:
    """Join the JAX cluster the environment describes (:func:`cluster_from_env`); False if none.

    Every process runs the same command. ``CRM_DIST_INIT_TIMEOUT`` (seconds, default 300)
    bounds the wait for the coordinator and the other processes; ``CRM_DIST_HEARTBEAT_TIMEOUT``
    (default 100) is how long a silent process may go before the others stop with JAX's
    "another task died" error. After joining, the process count JAX reports must equal the
    launcher's, else :class:`ClusterError` names both.
    """
    cluster = cluster_from_env(env)
    if cluster is None:
        return False
    import jax

    init_s = _timeout(env, INIT_TIMEOUT_ENV, 300)
    beat_s = _timeout(env, HEARTBEAT_TIMEOUT_ENV, 100)
    n, pid, addr = cluster["num_processes"], cluster["process_id"], cluster["coordinator"]
    if addr is not None and pid != 0:  # process 0 hosts the coordinator
        _wait_for_coordinator(addr, init_s, pid, n)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU: collectives between processes
    kw = dict(coordinator_address=addr, num_processes=n, process_id=pid) if cluster["launcher"] == "env" else {}
    jax.distributed.initialize(**kw, initialization_timeout=init_s, heartbeat_timeout_seconds=beat_s)
    if n is not None and jax.process_count() != n:
        raise ClusterError(
            f"{cluster['launcher']} launch declares {n} processes, but the cluster this "
            f"process joined has {jax.process_count()} (process {jax.process_index()})"
        )
    print(
        f"jax.distributed ({cluster['launcher']}): process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices",
        flush=True,
    )
    return True
