"""A train step as one jit, or split into jits so that host-offloaded arrays stay off the device
while the student's backward runs.

`memory.offload` keeps the power-EMA (float32, shaped like the student's parameters) and/or the
frozen teacher(s) in pinned host memory between steps (`sharding.state_shardings(..., offload=...)`).
Brought to the device inside one jitted step they do not lower its peak: XLA schedules the
host->device copies early, so the device copies live through the student's backward. `make_step`
therefore splits a step where those arrays are used, following the shardings it is given:

  teacher pass   student steps of the teacher modes, teachers in host memory: `Trainer.teacher_pass`
                 brings the teachers in and returns their outputs (`TeacherOutputs`: the CM
                 loss's teacher velocities; for DMD the scored rollout); the device copies die
                 with the pass.
  main step      `Trainer.student_step(..., teacher_out=...)` / `critic_step` on a state without
                 its EMA (`ema=None`) and a `Frozen` without teachers: it never sees either.
  EMA update     student steps, EMA in host memory: `Trainer.ema_step`, host -> device -> host
                 around the power-EMA update, after the main step.

The device memory of the main step is the one-jit step's less the EMA and the teachers; the
passes around it are small next to it (a teacher forward without backward; an elementwise
update). rCM's teacher pass uses both teacher fields and copies a shared teacher in twice.
The results equal the one-jit step's: the same operations, split (rounding may differ where
XLA fuses differently, <= 1e-6 relative in float32; tests/test_training.py).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from crm_jax.training import sharding as shd
from crm_jax.training.steps import Frozen, Trainer, TrainState


def on_host(shardings) -> bool:
    """Whether a tree of shardings is in pinned host memory (all leaves; an empty tree is not)."""
    kinds = {s.memory_kind for s in jax.tree.leaves(shardings)}
    if len(kinds) > 1:
        raise ValueError(f"a field's leaves must share one memory kind, got {sorted(map(str, kinds))}")
    return kinds == {"pinned_host"}


def place_frozen(frozen: Frozen, shardings: Frozen) -> Frozen:
    """`sharding.global_put(frozen, shardings)`, except that a DMD teacher that is the teacher (the
    same arrays, as the training program builds it without `init.dmd_teacher`) is placed once
    and stays shared (`device_put` copies each leaf: two pinned host copies of the teacher)."""
    if frozen.dmd_teacher is not frozen.teacher:
        return shd.global_put(frozen, shardings)
    teacher = shd.global_put(frozen.teacher, shardings.teacher)
    return Frozen(teacher, teacher, shd.global_put(frozen.neg_context, shardings.neg_context))


def _strip_teachers(frozen):
    return None if frozen is None else frozen.replace(teacher=None, dmd_teacher=None)


class Step:
    """`step(state, frozen, batch, key) -> (state, metrics)`: one train step of `make_step`.

    Attributes: `jits`, its jitted parts by name, run in this order: "teacher" (optional),
    "main", "ema" (optional); each a `shd.jit_step` wrapper whose `.jitted` is the `jax.jit`.
    """

    def __init__(self, mesh, jits: dict, strip_ema: bool, strip_teachers: bool):
        self.mesh, self.jits, self.strip_ema, self.strip_teachers = mesh, jits, strip_ema, strip_teachers

    def _main_args(self, state, frozen, batch, key):
        return (
            state.replace(ema=None) if self.strip_ema else state,
            _strip_teachers(frozen) if self.strip_teachers else frozen,
            batch,
            key,
        )

    def __call__(self, state: TrainState, frozen: Frozen | None, batch, key):
        args = self._main_args(state, frozen, batch, key)
        if "teacher" in self.jits:
            args += (self.jits["teacher"](args[0], frozen, batch, key),)
        new, metrics = self.jits["main"](*args)  # donates args[0] (the state without its EMA)
        del args  # the teacher outputs (for DMD the rollout's KV caches) die before the EMA update
        if "ema" in self.jits:
            return new.replace(ema=self.jits["ema"](state.ema, new.params, new.step, metrics["skipped"])), metrics
        return (new.replace(ema=state.ema) if self.strip_ema else new), metrics  # critic: EMA unchanged

    def lower(self, state: TrainState, frozen: Frozen | None, batch, key) -> list:
        """`jax.stages.Lowered` of the jits that take the step's own arguments ("main" without a
        teacher pass; "teacher" with one): `.compile()` them (also from other threads) and later
        calls with arguments like these reuse the executables. Traces only: nothing runs."""
        args = self._main_args(state, frozen, batch, key)
        with jax.set_mesh(self.mesh):
            if "teacher" in self.jits:
                return [self.jits["teacher"].jitted.lower(args[0], frozen, batch, key)]
            return [self.jits["main"].jitted.lower(*args)]

    def memory(self, state: TrainState, frozen: Frozen | None, batch, key) -> dict:
        """Compiled memory per jit, `{name: {argument, output, alias, temp, total, host}}` in bytes
        per device, total = argument + output - alias + temp (`memory_analysis()`, see `_stats`),
        and `flops` per device (`cost_analysis()`).
        Lowers and compiles only (nothing runs or is donated; after a call the compilations are
        cached). What one jit hands the next enters it as `ShapeDtypeStruct`s with the first's
        compiled output shardings, as in a call."""
        args = self._main_args(state, frozen, batch, key)
        out = {}
        with jax.set_mesh(self.mesh):
            if "teacher" in self.jits:
                teacher = self.jits["teacher"].jitted
                compiled = teacher.lower(args[0], frozen, batch, key).compile()
                out["teacher"] = _stats(compiled)
                args += (_specs(jax.eval_shape(teacher, args[0], frozen, batch, key), compiled.output_shardings),)
            main = self.jits["main"].jitted
            compiled = main.lower(*args).compile()
            out["main"] = _stats(compiled)
            if "ema" in self.jits:
                metrics = _specs(jax.eval_shape(main, *args)[1], compiled.output_shardings[1])
                out["ema"] = _stats(
                    self.jits["ema"].jitted.lower(state.ema, state.params, state.step, metrics["skipped"]).compile()
                )
        return out


def _specs(shapes, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _stats(compiled) -> dict:
    """Device bytes of a compiled jit (per device) and, as `host`, what the backend reports as
    host memory (arguments + outputs - aliases + temps; 0 on CPU, where pinned-host buffers count
    as device arguments)."""
    m = compiled.memory_analysis()
    d = dict(
        argument=m.argument_size_in_bytes,
        output=m.output_size_in_bytes,
        alias=m.alias_size_in_bytes,
        temp=m.temp_size_in_bytes,
    )
    d["total"] = d["argument"] + d["output"] - d["alias"] + d["temp"]
    d["host"] = (
        m.host_argument_size_in_bytes
        + m.host_output_size_in_bytes
        - m.host_alias_size_in_bytes
        + m.host_temp_size_in_bytes
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    d["flops"] = float((cost or {}).get("flops", 0.0))
    return d


def make_step(trainer: Trainer, mesh, shardings, which: str, sf_steps: int = 1, use_dmd: bool = True) -> Step:
    """The jitted step of one kind ("student" or "critic"), split where `shardings` put the EMA
    or the teachers in pinned host memory (see the module docstring); one jit otherwise.

    shardings: `(state, frozen, batch, key)` shardings (`shd.state_shardings` with `offload`,
      `shd.batch_shardings`, `shd.replicated`); `frozen`'s is None without a `Frozen`.
    The main step donates the state (without its EMA), the EMA update the EMA. A critic step
    uses neither the EMA nor the teachers: offloaded, they are left out of it.
    """
    if which not in ("student", "critic"):
        raise ValueError(f"which must be 'student' or 'critic', got {which!r}")
    st_sh, fr_sh, b_sh, key_sh = shardings
    strip_ema = on_host(st_sh.ema)
    strip_teachers = fr_sh is not None and on_host((fr_sh.teacher, fr_sh.dmd_teacher))
    main_sh = (
        st_sh.replace(ema=None) if strip_ema else st_sh,
        _strip_teachers(fr_sh) if strip_teachers else fr_sh,
        b_sh,
        key_sh,
    )
    jits = {}
    if which == "student":
        kw = dict(sf_steps=sf_steps, use_dmd=use_dmd)
        if strip_teachers and trainer.cfg.needs_teacher:
            jits["teacher"] = shd.jit_step(
                functools.partial(trainer.teacher_pass, **kw), mesh, (main_sh[0], fr_sh, b_sh, key_sh), None
            )
            main_sh += (None,)  # the teacher outputs, as the pass left them

            def main(state, frozen, batch, key, teacher_out):
                return trainer.student_step(state, frozen, batch, key, teacher_out=teacher_out, **kw)
        else:
            main = functools.partial(trainer.student_step, **kw)
    else:
        main = functools.partial(trainer.critic_step, sf_steps=sf_steps)
    jits["main"] = shd.jit_step(main, mesh, main_sh, (main_sh[0], None), donate_argnums=0)
    if which == "student" and strip_ema:
        jits["ema"] = shd.jit_step(
            trainer.ema_step, mesh, (st_sh.ema, st_sh.params, st_sh.step, None), st_sh.ema, donate_argnums=0
        )
    return Step(mesh, jits, strip_ema, strip_teachers)


def precompile(
    steps: list[Step], state: TrainState, frozen: Frozen | None, batch, key, threads: int | None = None
) -> float:
    """Compile several train steps at once (`Step.lower`, then XLA compiles in `threads` threads,
    default one per step), so that a loop that cycles through them (SF-DMD / rCM: one student and
    one critic step per self-forcing step count) does not stop to compile each in turn. Traces in
    this thread; nothing runs or is donated. Returns the wall seconds."""
    t0 = time.time()
    lowered = [low for s in steps for low in s.lower(state, frozen, batch, key)]
    with ThreadPoolExecutor(max_workers=threads or len(lowered)) as pool:
        list(pool.map(lambda low: low.compile(), lowered))
    return time.time() - t0
