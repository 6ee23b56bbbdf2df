"""Checks of a run config's values before anything is built or compiled.

Each bad value raises one :class:`crm_jax.errors.UsageError` naming the flag that sets it
(``--config.FIELD``), the value, and what it must be.
"""

from __future__ import annotations

from crm_jax.errors import UsageError

# field -> smallest allowed value (counts and periods)
MINIMUM = {
    "num_iterations": 1,
    "log_every": 1,
    "max_nan_streak": 1,
    "sample_every": 0,
    "eval_every": 0,
    "data.batch_size": 1,
    "checkpoint.every": 1,
    "checkpoint.keep": 1,
    "mesh.data": 1,
    "mesh.fsdp": 1,
    "mesh.context": 1,
    "train.block_frames": 1,
    "train.student_update_freq": 1,
    "train.sf_max_steps": 1,
    "train.dcm_steps": 1,
    "demo.teacher_steps": 1,
    "demo.synthetic_samples": 1,
    "demo.scm_iterations": 1,
    "demo.dmd_iterations": 1,
    "demo.eval_episodes": 1,
}
POSITIVE = ("train.lr", "train.critic_lr")  # > 0
CHOICES = {
    "data.kind": ("toy", "dataset"),
    "train.fm_weighting": ("bell", "none"),
    "train.sf_context": ("clean", "noisy"),
}


def _get(c, dotted: str):
    node = c
    for k in dotted.split("."):
        if node is None or not hasattr(node, "keys") or k not in node:
            return None
        node = node[k]
    return node


def check_run_config(c) -> None:
    """Raise `UsageError` for the first out-of-range count, unknown choice or non-positive rate."""
    for field, low in MINIMUM.items():
        v = _get(c, field)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise UsageError(f"--config.{field}={v!r}: must be an integer >= {low}")
    for field in POSITIVE:
        v = _get(c, field)
        if v is not None and not v > 0:
            raise UsageError(f"--config.{field}={v!r}: must be > 0")
    for field, options in CHOICES.items():
        v = _get(c, field)
        if v is not None and v not in options:
            raise UsageError(f"--config.{field}={v!r}: must be one of {', '.join(map(repr, options))}")
    if _get(c, "data.kind") == "dataset" and not _get(c, "data.path"):
        raise UsageError("--config.data.path is empty: data.kind='dataset' reads a generated dataset directory")
    sizes = {axis: _get(c, f"mesh.{axis}") for axis in ("data", "fsdp", "context")}
    if all(isinstance(v, int) for v in sizes.values()):
        import jax

        needed = sizes["data"] * sizes["fsdp"] * sizes["context"]
        if needed > jax.device_count():
            raise UsageError(
                f"--config.mesh: data={sizes['data']} x fsdp={sizes['fsdp']} x context={sizes['context']} needs "
                f"{needed} devices, {jax.device_count()} present: make the mesh smaller"
            )
