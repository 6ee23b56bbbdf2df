"""Ahead-of-time compilation of a config's train steps for a TPU topology or the local devices.

Nothing runs and nothing is allocated: parameters, optimizer state, teachers and batches are
`jax.ShapeDtypeStruct`s, and each step function of the run (`Trainer.plan` over the run's
iterations: one student step, and for SF-DMD / rCM student and critic steps per self-forcing
step count) is lowered and compiled for the devices of a mesh built like the training
program's (`sharding.make_mesh`). Compiling for TPU chips needs libtpu (`pip install
"jax[tpu]"`) but no TPU: `tpu_devices("v5p:2x2x2")` gives compile-only devices of a named
topology (`jax.experimental.topologies`).

`python -m crm_jax.tools.aot` is the command-line front end.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
from flax import nnx

from crm_jax.models.wan import WanModel, apply_for
from crm_jax.training import run_setup
from crm_jax.training import sharding as shd
from crm_jax.training.modes import get_mode
from crm_jax.training.offload import make_step
from crm_jax.training.steps import Frozen, Trainer
from pallas_kernels import ops

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip specs of a TPU generation: HBM, peak dense bf16 FLOP/s, HBM bandwidth."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float


# Cloud TPU documentation (per chip). `device_kind` of the compile-only devices -> specs.
CHIPS = {
    "TPU v4": Chip("v4", 32, 275, 1200),
    "TPU v5 lite": Chip("v5e", 16, 197, 819),
    "TPU v5": Chip("v5p", 95, 459, 2765),
    "TPU v6 lite": Chip("v6e", 32, 918, 1640),
}
# Topology names `get_topology_desc` accepts, by generation prefix (v5p is "v5").
TOPOLOGY = re.compile(r"^(v4|v5|v5p|v5e|v6e):(\d+)x(\d+)(?:x(\d+))?$")


class TopologyError(ValueError):
    pass


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """ "v5p:2x2x2" -> ("v5:2x2x2", (2, 2, 2)): libtpu's name and the chip grid; one clear error
    for anything else."""
    m = TOPOLOGY.match(name.strip())
    if not m:
        raise TopologyError(
            f"unknown TPU topology {name!r}: expected GEN:AxB[xC] with GEN one of v4, v5e, "
            "v5p, v6e (e.g. v5e:2x2, v5p:2x2x2, v4:2x2x1, v6e:2x4)"
        )
    gen = {"v5p": "v5"}.get(m.group(1), m.group(1))
    dims = tuple(int(d) for d in m.group(2, 3, 4) if d is not None)
    if min(dims) < 1:
        raise TopologyError(f"TPU topology {name!r} has an empty dimension")
    if gen in ("v4", "v5") and len(dims) != 3:
        raise TopologyError(f"{m.group(1)} slices are 3-D (e.g. {m.group(1)}:2x2x1), got {name!r}")
    if gen in ("v5e", "v6e") and len(dims) != 2:
        raise TopologyError(f"{m.group(1)} slices are 2-D (e.g. {m.group(1)}:2x2), got {name!r}")
    return f"{gen}:{'x'.join(map(str, dims))}", dims


def tpu_devices(name: str) -> list:
    """Compile-only TPU devices of a topology, e.g. "v5e:2x2", "v5p:2x2x2" (needs libtpu, no TPU).

    Call before anything else initialises JAX's backends in a process whose platform is CPU
    (`JAX_PLATFORMS=cpu`, `TPU_SKIP_MDS_QUERY=1`; `crm_jax.tools.aot` sets both)."""
    from jax.experimental import topologies

    libtpu_name, dims = parse_topology(name)
    # v4 / v5p hosts hold 2x2x1 chips; v5e / v6e single-host slices up to 2x4, multi-host ones 2x2.
    if len(dims) == 3:
        per_host = (min(dims[0], 2), min(dims[1], 2), 1)
    elif dims[0] * dims[1] <= 8:
        per_host = (dims[0], dims[1], 1)
    else:
        per_host = (min(dims[0], 2), min(dims[1], 2), 1)
    try:
        topo = topologies.get_topology_desc(
            topology_name=libtpu_name,
            platform="tpu",
            chip_config_name="default",
            chips_per_host_bounds=per_host,
            num_slices=1,
        )
    except ModuleNotFoundError as e:
        raise TopologyError(
            "compiling for TPU needs libtpu: pip install 'jax[tpu]==0.11.2' (libtpu 0.0.48.x); no TPU is needed"
        ) from e
    except Exception as e:  # libtpu's own message names what it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"libtpu does not know TPU topology {name!r}: {first}") from e
    return list(topo.devices)


def chip_of(devices) -> Chip | None:
    return CHIPS.get(devices[0].device_kind)


def abstract_params(cfg):
    """The parameters of a config's model as `ShapeDtypeStruct`s (nothing allocated)."""
    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


def abstract_batch(c, mcfg, latent_shape: tuple[int, ...]) -> dict:
    """The batch a step consumes, `[B, T, H, W, C]` latents of `latent_shape` = (T, H, W, C)."""
    b = int(c.data.batch_size)
    f32 = jnp.float32
    batch = {
        "latents": jax.ShapeDtypeStruct((b, *latent_shape), f32),
        "context": jax.ShapeDtypeStruct((b, mcfg.text_len, mcfg.text_dim), f32),
    }
    if mcfg.num_actions:
        batch["actions"] = jax.ShapeDtypeStruct((b, latent_shape[0]), jnp.int32)
    if get_mode(c.mode).needs_ode_data:
        k = int(c.get("aot", {}).get("ode_points", 4))
        batch["ode_traj"] = jax.ShapeDtypeStruct((b, k, *latent_shape), f32)
        batch["ode_times"] = jax.ShapeDtypeStruct((k,), f32)
    return batch


def latent_shape_of(c) -> tuple[int, ...]:
    """(T, H, W, C) of the training latents: `c.data.latent_shape`, the dataset's metadata, or the
    toy world's."""
    if c.data.get("latent_shape"):
        return tuple(int(x) for x in c.data.latent_shape)
    if c.data.kind == "toy":
        from crm_jax.data.sources import make_source

        return tuple(make_source(c, run_setup.model_config(c)).latent_shape)
    meta = os.path.join(str(c.data.get("path", "")), "metadata.json")
    if os.path.exists(meta):
        import json

        with open(meta) as f:
            return tuple(json.load(f)["features"]["latents"]["shape"])
    raise ValueError(
        "the latent shape is unknown: set --config.data.latent_shape=T,H,W,C "
        f"(no toy world and no dataset metadata at {meta!r})"
    )


def step_plans(c, trainer: Trainer) -> list[tuple[str, int, bool]]:
    """Every distinct step function a run of `c` calls (`Trainer.plan` over its iterations)."""
    tcfg = trainer.cfg
    n = int(c.num_iterations)
    if tcfg.has_critic:  # the plan is periodic past the warm-up: one period after it covers the run
        warm = tcfg.tangent_warmup if tcfg.spec.tangent_warmup else 0
        n = min(n, warm + tcfg.sf_max_steps * tcfg.student_update_freq)
    iters = range(n)
    return sorted({trainer.plan(i, tcfg.student_update_freq) for i in iters})


@dataclasses.dataclass
class StepReport:
    """One compiled step: memory per device (bytes: the largest of `Step.memory`'s jits), FLOPs per
    device as `cost_analysis()` counts them (each loop body once, so the layer scan counts as one
    layer: a lower bound), seconds to compile."""

    name: str
    argument: int
    output: int
    temp: int
    alias: int
    total: int
    host: int
    flops: float
    seconds: float

    def fits(self, hbm_gib: float | None) -> bool | None:
        return None if hbm_gib is None else self.total <= hbm_gib * GIB


def build(c, devices, latent_shape: tuple[int, ...] | None = None):
    """(trainer, mesh, state, frozen, batch, key, shardings) of `c`, all abstract, on `devices`."""
    mcfg = run_setup.model_config(c)
    tcfg = run_setup.train_config(c)
    teacher_cfg = run_setup.teacher_model_config(c, mcfg)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.get("context", 1), devices=devices)
    shd.check_batch(c.data.batch_size, mesh)
    trainer = Trainer(
        tcfg, apply_for(mcfg), mcfg, teacher_apply=None if teacher_cfg == mcfg else apply_for(teacher_cfg)
    )
    params = abstract_params(mcfg)
    frozen = None
    if tcfg.needs_teacher or tcfg.cond_dropout > 0:
        teacher = abstract_params(teacher_cfg) if tcfg.needs_teacher else None
        neg = jax.ShapeDtypeStruct((mcfg.text_len, mcfg.text_dim), jnp.float32)
        frozen = Frozen(teacher, teacher, neg)
    critic = frozen.dmd_teacher if tcfg.has_critic else None
    state = jax.eval_shape(trainer.init_state, params, critic)
    offload = run_setup.offload_fields(c)
    st_sh = shd.state_shardings(state, mesh, offload=tuple(f for f in offload if f == "ema"))
    fr_sh = (
        None if frozen is None else shd.state_shardings(frozen, mesh, offload=tuple(f for f in offload if f != "ema"))
    )
    batch = abstract_batch(c, mcfg, latent_shape or latent_shape_of(c))
    b_sh = shd.batch_shardings(batch, mesh, c.data.batch_size)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key_sh = shd.replicated(key, mesh)

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    state, batch, key = place(state, st_sh), place(batch, b_sh), place(key, key_sh)
    if frozen is not None:
        frozen = place(frozen, fr_sh)
    return trainer, mesh, state, frozen, batch, key, (st_sh, fr_sh, b_sh, key_sh)


def compile_steps(
    c, devices, *, platform: str, latent_shape: tuple[int, ...] | None = None, plans=None, on_step=None
) -> list[StepReport]:
    """Compile every step function of `c` (or `plans`) for `devices`; attention is traced for
    `platform` ("tpu" | "gpu" | "cpu", `ops.target_platform`). `on_step(report)` is called as
    each one finishes. Raises on the first step that does not compile."""
    import time

    with ops.target_platform(platform):
        trainer, mesh, state, frozen, batch, key, shardings = build(c, devices, latent_shape)
        reports = []
        for which, sf_steps, use_dmd in plans or step_plans(c, trainer):
            t0 = time.time()
            step = make_step(trainer, mesh, shardings, which, sf_steps=sf_steps, use_dmd=use_dmd)
            parts = step.memory(state, frozen, batch, key)
            name = (
                which
                if not trainer.cfg.has_critic
                else f"{which} ({sf_steps} SF step{'s' if sf_steps > 1 else ''}{'' if use_dmd else ', no DMD'})"
            )
            peak = max(parts.values(), key=lambda p: p["total"])
            rep = StepReport(
                name=name,
                argument=peak["argument"],
                output=peak["output"],
                temp=peak["temp"],
                alias=peak["alias"],
                total=peak["total"],
                host=sum(p["host"] for p in parts.values()),
                flops=sum(p["flops"] for p in parts.values()),
                seconds=time.time() - t0,
            )
            reports.append(rep)
            if on_step is not None:
                on_step(rep)
    return reports


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> float:
    """max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth): a lower bound, not a measurement."""
    return max(flops / (chip.bf16_tflops * 1e12), bytes_accessed / (chip.hbm_gbps * 1e9))


__all__ = [
    "CHIPS",
    "Chip",
    "StepReport",
    "TopologyError",
    "abstract_batch",
    "abstract_params",
    "build",
    "chip_of",
    "compile_steps",
    "latent_shape_of",
    "parse_topology",
    "roofline_seconds",
    "step_plans",
    "tpu_devices",
]
