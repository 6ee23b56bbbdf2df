"""Orbax checkpoints of the train state: async, keep-N, exact resume, identity checks.

Each checkpoint holds the `TrainState` and a JSON `meta` (mode, model config,
data-iterator position). A workdir whose checkpoint was written for another model
or mode is refused before any compute, and nothing in it is overwritten.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from crm_jax.models.config import RUNTIME_FIELDS


class CheckpointMismatch(ValueError):
    pass


def identity(meta: dict) -> dict:
    """The part of `meta` that must match for a resume (JSON-normalised: tuples -> lists)."""
    ident = json.loads(json.dumps({k: meta[k] for k in ("mode", "model") if k in meta}))
    if isinstance(ident.get("model"), dict):
        for k in ("runtime", *RUNTIME_FIELDS):  # nested, or flat in older metadata
            ident["model"].pop(k, None)
    return ident


class Checkpoints:
    """Thin wrapper over `ocp.CheckpointManager` for `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.dir, options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int) -> dict:
        fn = os.path.join(self.dir, str(step), "meta", "metadata")
        if os.path.exists(fn):
            with open(fn) as f:
                return json.load(f)
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def check_compatible(self, meta: dict) -> int | None:
        """Latest step if the workdir holds a compatible checkpoint; raise if incompatible."""
        step = self.latest_step()
        if step is None:
            return None
        old = identity(self.read_meta(step))
        new = identity(meta)
        if old != new:
            diff = {k: (old.get(k), new.get(k)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
            raise CheckpointMismatch(
                f"workdir checkpoint {self.dir}/{step} belongs to a different run (checkpoint vs config): "
                f"{json.dumps(diff, default=str)[:2000]}. Use another --workdir; nothing was overwritten."
            )
        return step

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
        )

    def restore(self, step: int, abstract_state):
        """Restore onto the shardings/dtypes of `abstract_state` (a pytree of ShapeDtypeStructs)."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        )
        return out["state"], dict(out["meta"])

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with shardings) of `tree`, for `restore`."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
