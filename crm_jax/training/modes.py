"""The training modes: one table that every consumer (steps, loop, AOT, configs, inputs) reads.

Each mode is a frozen `Mode`; `get_mode(name)` is the only lookup and raises one error
listing the known modes for an unknown name. Importing this module pulls in no JAX.
"""

from __future__ import annotations

import dataclasses

# The CM (forward-divergence) losses a student step can take; None = no CM loss (pure DMD).
CM_LOSSES = (
    "flow_matching",  # bidirectional flow matching
    "teacher_forcing",  # flow matching on the packed [clean | noisy] video
    "diffusion_forcing",  # flow matching with per-block times
    "scm",  # TF-sCM (RF form, jvp through the whole network)
    "meanflow",  # TF-MeanFlow (model with `mean_flow=True`)
    "dcm",  # TF-dCM (discrete-time CM)
    "ode_regression",  # ODE-regression initialisation on teacher trajectories
)


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a training mode is made of.

    name: the config's `mode`.
    summary: one line for help texts.
    loss: the student step's CM loss (one of `CM_LOSSES`), None for a DMD-only student step.
    cm_teacher: how the CM loss sees the frozen teacher: "velocity" (the teacher-forcing
      velocity on the packed video), "tf_velocity" (the velocity of the noisy half only,
      clean context from `cond["tf_context"]`), or None (no teacher in the CM loss).
    needs_teacher: the run loads frozen teacher parameters (`init.teacher`).
    has_critic: a DMD part with a trained critic (fake score) and critic steps in between.
    tangent_warmup: the DMD part is off during `train.tangent_warmup` (rCM).
    needs_ode_data: batches carry `ode_traj` / `ode_times`.
    sampler: (method, steps) of the samples written during training (`sampling.causal`).
    sample_pattern: the attention pattern those samples are generated with.
    """

    name: str
    summary: str
    loss: str | None
    cm_teacher: str | None = None
    needs_teacher: bool = False
    has_critic: bool = False
    tangent_warmup: bool = False
    needs_ode_data: bool = False
    sampler: tuple[str, int] = ("consistency", 2)
    sample_pattern: str = "block_causal"

    def __post_init__(self):
        if self.loss is not None and self.loss not in CM_LOSSES:
            raise ValueError(f"mode {self.name!r}: unknown loss {self.loss!r} (known: {CM_LOSSES})")
        if self.cm_teacher not in (None, "velocity", "tf_velocity"):
            raise ValueError(f"mode {self.name!r}: unknown cm_teacher {self.cm_teacher!r}")
        if self.cm_teacher is not None and not self.needs_teacher:
            raise ValueError(f"mode {self.name!r}: a CM teacher needs needs_teacher=True")
        if self.loss is None and not self.has_critic:
            raise ValueError(f"mode {self.name!r} has neither a CM loss nor a DMD part")


_EULER = ("euler", 16)

_TABLE = (
    Mode("teacher_full", "bidirectional flow matching (the bidirectional teacher)", "flow_matching",
         sampler=_EULER, sample_pattern="full"),
    Mode("teacher_tf", "causal teacher by teacher forcing (packed [clean | noisy], bell weight)",
         "teacher_forcing", sampler=_EULER),
    Mode("teacher_df", "causal teacher by diffusion forcing (per-block times)", "diffusion_forcing",
         sampler=_EULER),
    Mode("tf_scm", "TF-sCM student", "scm", cm_teacher="velocity", needs_teacher=True),
    Mode("tf_meanflow", "TF-MeanFlow student", "meanflow", cm_teacher="tf_velocity", needs_teacher=True),
    Mode("tf_dcm", "TF-dCM student (discrete-time CM baseline)", "dcm", cm_teacher="velocity",
         needs_teacher=True),
    Mode("ode_init", "ODE-regression initialisation (CausVid / Self-Forcing baseline)", "ode_regression",
         needs_ode_data=True),
    Mode("sf_dmd", "self-forcing DMD: generator steps and critic steps", None, needs_teacher=True,
         has_critic=True),
    Mode("rcm", "TF-sCM + lambda * SF-DMD student steps, critic steps in between", "scm",
         cm_teacher="velocity", needs_teacher=True, has_critic=True, tangent_warmup=True),
)  # fmt: skip

REGISTRY: dict[str, Mode] = {m.name: m for m in _TABLE}
MODES: tuple[str, ...] = tuple(REGISTRY)


def get_mode(name: str) -> Mode:
    """The registered `Mode` called `name`; a ValueError listing the known modes otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown training mode {name!r}; known modes: {MODES}") from None


def modes_where(**fields) -> tuple[str, ...]:
    """Names of the modes whose fields equal `fields`, e.g. `modes_where(has_critic=True)`."""
    return tuple(m.name for m in _TABLE if all(getattr(m, k) == v for k, v in fields.items()))
