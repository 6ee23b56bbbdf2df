"""Orbax checkpoints of the train state: async, keep-N, exact resume, identity checks.

Each checkpoint holds the `TrainState` and a JSON `meta` (mode, model architecture, what the
run was initialised from, data-iterator position). A workdir whose checkpoint was written for
another mode, model or initialisation is refused before any compute, with the differing fields,
and nothing in it is overwritten. An unreadable latest checkpoint falls back to the newest intact
one, with a warning naming both.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import orbax.checkpoint as ocp

from crm_jax.errors import CrmError, UsageError
from crm_jax.models.config import RUNTIME_FIELDS


class CheckpointMismatch(UsageError):
    """The workdir holds another run's checkpoints (exit code 2)."""


class CheckpointError(CrmError):
    """No readable checkpoint where one is needed (exit code 1)."""


def fingerprint(path: str, content_limit: int = 512 << 20) -> str:
    """An identity of a checkpoint directory or file: a hash of its files' contents when they total
    at most `content_limit` bytes, else of their names, sizes and modification times. "" for an
    empty path."""
    if not path:
        return ""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    by_content = sum(os.path.getsize(f) for f in files) <= content_limit
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.relpath(f, path)}:{st.st_size}\n".encode())
        if by_content:
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
        else:
            h.update(f"{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def identity(meta: dict) -> dict:
    """The part of `meta` that must match for a resume (JSON-normalised: tuples -> lists). An
    initialisation is identified by its fingerprint (its path only when it has none), so the same
    checkpoint found at another path (an installed package, a moved checkout) still resumes."""
    ident = json.loads(json.dumps({k: meta[k] for k in ("mode", "model", "init") if k in meta}))
    for source in (ident.get("init") or {}).values():
        if isinstance(source, dict) and source.get("fingerprint"):
            source.pop("path", None)
    if isinstance(ident.get("model"), dict):
        for k in ("runtime", *RUNTIME_FIELDS):  # nested, or flat in older metadata
            ident["model"].pop(k, None)
    return ident


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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
        try:
            if os.path.exists(fn):
                with open(fn) as f:
                    return json.load(f)
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(restored["meta"])
        except Exception as e:
            raise CheckpointError(f"checkpoint {self.dir}/{step}: cannot read its metadata {fn} ({e})") from e

    def steps(self) -> list[int]:
        """Saved steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def check_compatible(self, meta: dict) -> int | None:
        """Newest step whose metadata is readable, if the workdir's run is this one; raise if it is
        another run's (`CheckpointMismatch`, naming only the differing fields)."""
        step, old, unreadable = None, None, []
        for s in self.steps():
            try:
                old = identity(self.read_meta(s))
                step = s
                break
            except CheckpointError as e:
                unreadable.append(s)
                _warn(f"{e}; trying an older checkpoint")
        if unreadable:  # kept for inspection, out of the way of the steps that will be saved again
            self._set_aside(unreadable)
            _warn(f"moved the checkpoints with unreadable metadata ({unreadable}) to {self.dir}_unreadable/")
        if step is None:
            return None
        a, b = _flat(old), _flat(identity(meta))
        diff = [
            f"{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
        if diff:
            raise CheckpointMismatch(
                f"--workdir holds another run's checkpoint ({self.dir}/{step}; {'; '.join(diff[:6])}"
                f"{'; ...' if len(diff) > 6 else ''}): use another --workdir (nothing was overwritten)"
            )
        return step

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        return self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
        )

    def restore(self, step: int, abstract_state):
        """Restore step `step` (or, if it is unreadable, the newest older one that is) onto the
        shardings/dtypes of `abstract_state` (a pytree of ShapeDtypeStructs). Returns
        `(state, meta)`; `meta["restored_step"]` is the step restored."""
        errors = []
        for s in [x for x in self.steps() if x <= step]:
            try:
                out = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:
                errors.append(f"{self.dir}/{s} ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
                _warn(f"checkpoint {errors[-1]} is unreadable; trying an older one")
                continue
            if errors:
                self._set_aside([x for x in self.steps() if x > s])
                _warn(
                    f"resuming from {self.dir}/{s} instead of the unreadable {self.dir}/{step} "
                    f"(moved to {self.dir}_unreadable/)"
                )
            return out["state"], {**dict(out["meta"]), "restored_step": s}
        raise CheckpointError(
            f"no readable checkpoint in {self.dir}: {'; '.join(errors)}; remove the damaged ones or use another --workdir"
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Move unreadable checkpoints out of the way (kept, for inspection) so that training can
        save those steps again."""
        if jax.process_index() == 0 and steps:
            os.makedirs(f"{self.dir}_unreadable", exist_ok=True)
            for s in steps:
                os.replace(os.path.join(self.dir, str(s)), os.path.join(f"{self.dir}_unreadable", str(s)))
        if jax.process_count() > 1:
            from crm_jax.distributed import barrier

            barrier("unreadable checkpoints set aside")
        self.manager.reload()

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


def _warn(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {msg}", file=sys.stderr)
