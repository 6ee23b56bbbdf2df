"""From a training config to the run's pieces: the model and step configs, the parameters to start
from, the checkpoint metadata, memory offload and precompile settings, and the exported weights."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from crm_jax.models import convert
from crm_jax.models.config import RUNTIME_FIELDS, WanConfig, model_config_from, same_architecture
from crm_jax.models.wan import functional, init_model
from crm_jax.training.checkpoints import CheckpointError
from crm_jax.training.steps import TrainConfig


def model_config(c) -> WanConfig:
    return model_config_from(c.model)


# What a teacher must share with its student: the data it reads and writes.
INTERFACE_FIELDS = ("in_channels", "out_channels", "patch_size", "text_dim", "text_len", "num_actions")


def offload_fields(c) -> tuple[str, ...]:
    """`c.memory.offload` ("ema", "teacher" or "ema,teacher") -> fields kept in host memory."""
    names = [n.strip() for n in str(c.get("memory", {}).get("offload", "") or "").split(",") if n.strip()]
    bad = set(names) - {"ema", "teacher"}
    if bad:
        raise ValueError(f"memory.offload takes 'ema' and/or 'teacher', got {sorted(bad)}")
    return tuple(f for n in names for f in (("teacher", "dmd_teacher") if n == "teacher" else (n,)))


def teacher_model_config(c, student: WanConfig) -> WanConfig:
    """The teacher's (and the DMD critic's) architecture.

    `c.teacher_model` (same form as `c.model`: name + overrides) lets a larger teacher
    distil into a smaller student (e.g. a 14B teacher for a 1.3B student); without it the
    teacher has the student's architecture. The teacher always predicts the instantaneous
    velocity (mean_flow=False), must read and write the student's latents, text and
    actions, and inherits the student's dtype / param_dtype / remat / attention settings
    unless its overrides set them.
    """
    block = c.get("teacher_model")
    if not block or not block.get("name"):
        return student.replace(mean_flow=False)
    over = block.get("overrides", {}) or {}
    inherited = {
        k: getattr(student.runtime if k in RUNTIME_FIELDS else student, k)
        for k in ("dtype", "param_dtype", "remat", "attn_impl", "attn_tiles", "attn_interpret")
        if k not in over
    }
    teacher = model_config_from(block).replace(mean_flow=False, **inherited)
    bad = {
        f: (getattr(teacher, f), getattr(student, f))
        for f in INTERFACE_FIELDS
        if getattr(teacher, f) != getattr(student, f)
    }
    if bad:
        raise ValueError(
            "teacher_model must share the student's input/output interface; differing "
            + ", ".join(f"{f}: teacher {a} vs student {b}" for f, (a, b) in bad.items())
        )
    return teacher


def train_config(c) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kw = {k: v for k, v in c.train.items() if k in fields}
    unknown = set(c.train.keys()) - fields
    if unknown:
        raise ValueError(f"unknown train config keys {sorted(unknown)}; known: {sorted(fields)}")
    return TrainConfig(mode=c.mode, **kw)


def load_params(path: str, mcfg: WanConfig, seed: int):
    """Parameters from a checkpoint directory, or a random init when `path` is empty."""
    if not path:
        return functional(init_model(mcfg, seed))[1]
    try:
        model = convert.load_any(path)
    except Exception as e:  # a damaged Orbax/safetensors file: the reader's own message can be very long
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {first})") from e
    if not same_architecture(model.cfg, mcfg):
        raise ValueError(f"checkpoint {path} has model config {model.cfg}, expected {mcfg}")
    return functional(model)[1]


def run_meta(c, mcfg: WanConfig) -> dict:
    """What identifies a run: its mode, architecture and the checkpoints it was initialised from
    (path and fingerprint), so that a changed earlier stage is not silently resumed over."""
    from crm_jax.training.checkpoints import fingerprint

    init = {k: c.init.get(k, "") for k in ("student", "teacher", "dmd_teacher")} if "init" in c else {}
    init = {k: {"path": v, "fingerprint": fingerprint(v) if os.path.exists(v) else ""} for k, v in init.items() if v}
    return {"mode": c.mode, "model": dataclasses.asdict(mcfg), "init": init}


def precompile_threads(c) -> int:
    """`c.precompile`: -1 = compile lazily, 0 = every step function at once, N > 0 = N at a time."""
    threads = int(c.get("precompile", 0))
    if threads < -1:
        raise ValueError(f"precompile must be -1 (lazily), 0 (all at once) or N > 0 at a time, got {threads}")
    return threads


def export_model(model, params, path: str) -> None:
    """Write `params` into `model`'s structure as a crm_jax NNX checkpoint (teacher/student input)."""
    from flax import nnx

    params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), jax.device_get(params), nnx.state(model, nnx.Param))
    nnx.update(model, params)
    convert.save_nnx(model, path)


def mean_flow_from(teacher, params):
    """Initialise a MeanFlow student (params tree) from an RF teacher (params tree of the same
    architecture without the interval embedder): copy shared parameters, keep the
    interval embedder's init but zero its output layer so u(z, t, t) = v at step 0."""
    out = jax.tree.map(lambda x: x, params)
    copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # the state is donated: no aliasing
    for k, v in teacher.items():
        if k == "condition_embedder":
            for kk, vv in v.items():
                out[k][kk] = copy(vv)
        else:
            out[k] = copy(v)
    ie = out["condition_embedder"]["interval_embedder"]["linear_2"]
    ie["kernel"] = jnp.zeros_like(ie["kernel"])
    ie["bias"] = jnp.zeros_like(ie["bias"])
    return out
