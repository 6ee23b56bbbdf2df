"""The training program behind `python -m crm_jax.main` (the modes of `crm_jax.training.modes`).

Builds the models from the config (random init or converted checkpoints), the
mesh and shardings, restores `--workdir` if it holds a compatible checkpoint, then
runs iterations with a progress bar, JSONL + TensorBoard metrics, periodic and
SIGTERM checkpoints, and NaN skipping (stop after `max_nan_streak` in a row).

Several processes (`crm_jax.distributed`) run the same program: each reads only its rows of
every global batch, all save and restore the Orbax checkpoints together and must agree on the
step they resume from, and process 0 alone writes the metrics, TensorBoard events, progress
bar, samples, evaluations and the export.

The data source and the sample writer come from the entry point (`crm_jax.pipeline`): `train`
takes a source factory `(c, mcfg) -> source` and an optional `on_sample(run, params, iteration)`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import jax
from tqdm import tqdm

from crm_jax import distributed as dist
from crm_jax.errors import UsageError
from crm_jax.inputs import check_inputs, training_inputs
from crm_jax.models.config import WanConfig
from crm_jax.models.wan import apply_for, functional, init_model
from crm_jax.training import run_setup as rs
from crm_jax.training import sharding as shd
from crm_jax.training.checkpoints import Checkpoints, abstract_like
from crm_jax.training.modes import get_mode
from crm_jax.training.offload import make_step, place_frozen, precompile
from crm_jax.training.steps import Frozen, TrainConfig, Trainer, TrainState


class NanStreakError(RuntimeError):
    pass


class MetricsWriter:
    """JSONL always; TensorBoard event files when tensorboardX is installed. Writes nothing
    with `enabled=False` (the processes other than process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.jsonl = self.tb = None
        if not enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # documented optional dependency
            self.tb = None

    def write(self, step: int, metrics: dict):
        if self.jsonl is None:
            return
        row = {"iteration": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "iteration":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


@dataclasses.dataclass
class Run:
    """One training run, as its stages build it up: the configs, the source, the model, the
    mesh and shardings, the checkpoints, the current state and the frozen networks."""

    c: Any
    workdir: str
    mcfg: WanConfig
    tcfg: TrainConfig
    mesh: Any
    meta: dict
    ckpts: Checkpoints
    start_step: int | None
    source: Any = None
    model: Any = None
    apply: Any = None
    trainer: Trainer | None = None
    state: TrainState | None = None
    frozen: Frozen | None = None
    shardings: tuple | None = None  # (state, frozen, batch, key): the step's input shardings

    def batch(self, it: int):
        """The global batch of iteration `it`, placed with the batch shardings."""
        return shd.global_batch(model_batch(self.source.batch(it)), self.shardings[2], self.c.data.batch_size)

    def key(self, it: int):
        """The step key of iteration `it` (the same on every process)."""
        return shd.global_put(jax.random.fold_in(jax.random.key(self.c.seed), it), self.shardings[3])


def train(
    c,
    workdir: str,
    *,
    source,
    max_iterations: int | None = None,
    progress: bool = True,
    evaluator=None,
    on_sample=None,
) -> dict:
    """Run (or resume) training. Returns a summary dict (final metrics, losses per iteration).

    source: the source factory `(c, mcfg) -> source` (`crm_jax.data.sources.make_source`); a source
      has `batch(iteration) -> dict` and `negative_context()`.
    evaluator: `evaluator(iteration, state) -> dict` (optional) runs before the first iteration of a
      fresh run, every `c.eval_every` iterations and at the end (on every process); its results are
      appended to `workdir/eval.jsonl` as `{"iteration": i, **result}` (by process 0).
    on_sample: `on_sample(run, params, iteration)` (optional) every `c.sample_every` iterations and
      at the end, on process 0 with host parameters (`crm_jax.pipeline.sample_hook`).
    """
    run = setup(c, workdir, source)
    build(run)
    place(run)
    total = c.num_iterations if max_iterations is None else min(c.num_iterations, max_iterations)
    step_fn = compile_steps(run, total)
    first = int(run.state.iteration)
    t_start = time.time()
    losses, metrics, stopped_by = iterate(
        run, step_fn, total, progress=progress, evaluator=evaluator, on_sample=on_sample
    )
    export(run, trained=int(run.state.iteration) > first)
    state = run.state
    return dict(
        stopped_by=stopped_by,
        losses=losses,
        metrics=metrics,
        iteration=int(state.iteration),
        step=int(state.step),
        nan_skips=int(state.nan_skips),
        seconds=time.time() - t_start,
        state=state,
    )


def setup(c, workdir: str, source) -> Run:
    """Config checks (before the workdir is touched), the mesh, the checkpoints and the step to
    resume from (agreed on by every process), and the data source."""
    mcfg = rs.model_config(c)
    tcfg = rs.train_config(c)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.get("context", 1))
    shd.check_batch(c.data.batch_size, mesh)
    rs.precompile_threads(c)
    rs.offload_fields(c)
    check_inputs(training_inputs(c), f"{c.mode} config")  # missing checkpoints / dataset: same
    meta = rs.run_meta(c, mcfg)
    os.makedirs(workdir, exist_ok=True)
    ckpts = Checkpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.get("async_save", True))
    start_step = ckpts.check_compatible(meta)  # raises before any compute on mismatch
    found = dist.agree(-1 if start_step is None else start_step, f"the checkpoint step to resume from in {ckpts.dir}")
    run = Run(c, workdir, mcfg, tcfg, mesh, meta, ckpts, None if found < 0 else found)
    run.source = source(c, mcfg)
    if get_mode(c.mode).needs_ode_data and "ode_traj" not in run.source.batch(0):
        raise UsageError(
            f"mode {c.mode!r} regresses onto the teacher's ODE points, which --config.data does not hold: "
            f"generate a dataset with --config.ode.save=True (crm-generate) and train on it with "
            f"--config.data.kind=dataset --config.data.path=DIR"
        )
    return run


def build(run: Run) -> None:
    """The model, the trainer, the frozen networks and a fresh train state (host or device default)."""
    c, mcfg, tcfg = run.c, run.mcfg, run.tcfg
    run.model = init_model(mcfg, c.seed)
    run.apply, params = functional(run.model)
    if c.init.student:
        params = rs.load_params(c.init.student, mcfg, c.seed)
    teacher_cfg = rs.teacher_model_config(c, mcfg)
    teacher_apply = None if teacher_cfg == mcfg else apply_for(teacher_cfg)
    run.trainer = Trainer(tcfg, run.apply, mcfg, teacher_apply=teacher_apply)
    run.frozen = frozen_networks(c, tcfg, teacher_cfg, run.source)
    if tcfg.needs_teacher and mcfg.mean_flow and not c.init.student:
        if teacher_cfg != mcfg.replace(mean_flow=False):
            raise ValueError(
                "a MeanFlow student is initialised from its teacher, so it needs the "
                "teacher's architecture (or init.student)"
            )
        params = rs.mean_flow_from(run.frozen.teacher, params)
    critic = run.frozen.dmd_teacher if tcfg.has_critic else None
    run.state = run.trainer.init_state(params, critic)


def frozen_networks(c, tcfg: TrainConfig, teacher_cfg: WanConfig, source) -> Frozen | None:
    """The frozen teacher / DMD teacher and the negative prompt (None when the mode needs neither)."""
    if tcfg.needs_teacher:
        if not c.init.teacher and not c.init.get("allow_random_teacher", False):
            raise ValueError(f"mode {c.mode!r} needs init.teacher (a checkpoint directory)")
        teacher = rs.load_params(c.init.teacher, teacher_cfg, c.seed + 1)
        dmd_teacher = (
            rs.load_params(c.init.dmd_teacher, teacher_cfg, c.seed + 2) if c.init.get("dmd_teacher") else teacher
        )
        return Frozen(teacher, dmd_teacher, source.negative_context())
    if tcfg.cond_dropout > 0:
        return Frozen(None, None, source.negative_context())
    return None


def place(run: Run) -> None:
    """Restore the checkpoint to resume from (if any) and place the state and the frozen networks
    on the mesh (offloaded fields in pinned host memory); fixes the step's input shardings."""
    c, mesh, state, frozen = run.c, run.mesh, run.state, run.frozen
    offload = rs.offload_fields(c)
    if offload:
        dist.log(
            f"memory.offload: {', '.join(offload)} in pinned host memory; each step runs as teacher "
            f"pass / main step / EMA update (crm_jax/training/offload.py)"
        )
    st_sh = shd.state_shardings(state, mesh, offload=tuple(f for f in offload if f == "ema"))
    fr_sh = None
    if frozen is not None:
        fr_sh = shd.state_shardings(frozen, mesh, offload=tuple(f for f in offload if f != "ema"))
    if run.start_step is not None:  # restored into device memory, then placed like a fresh state
        target = abstract_like(state, shd.state_shardings(state, mesh))
        state, restored = run.ckpts.restore(run.start_step, target)
        dist.log(f"resumed from {run.ckpts.dir}/{restored['restored_step']} (iteration {int(state.iteration)})")
    run.state = shd.global_put(state, st_sh)
    if frozen is not None:
        run.frozen = place_frozen(frozen, fr_sh)
    b_sh = shd.batch_shardings(model_batch(run.source.batch(0)), mesh, c.data.batch_size)
    run.shardings = (st_sh, fr_sh, b_sh, shd.replicated(jax.random.key(0), mesh))


def compile_steps(run: Run, total: int):
    """`step_fn(iteration)`: the jitted step of that iteration's plan (one per plan, cached); with
    `c.precompile` >= 0 and several plans, all of them compiled up front (N at a time)."""
    trainer, freq = run.trainer, run.tcfg.student_update_freq

    @functools.cache
    def compiled(which: str, sf_steps: int, use_dmd: bool):
        return make_step(trainer, run.mesh, run.shardings, which, sf_steps=sf_steps, use_dmd=use_dmd)

    threads = rs.precompile_threads(run.c)
    first = int(run.state.iteration)
    plans = sorted({trainer.plan(it, freq) for it in range(first, total)})
    if plans and threads >= 0:  # compiled before the first step, so the progress bar's ETA is right
        names = ", ".join(f"{w}/{n} SF steps" if run.tcfg.has_critic else w for w, n, _ in plans)
        dist.log(f"compiling {len(plans)} step function{'s' if len(plans) > 1 else ''} ({names}) ...")
        fns = [compiled(*p) for p in plans]
        secs = precompile(fns, run.state, run.frozen, run.batch(first), run.key(0), threads=threads or None)
        dist.log(f"compiled in {secs:.0f} s")
    return lambda it: compiled(*trainer.plan(it, freq))


def iterate(run: Run, step_fn, total: int, *, progress: bool, evaluator, on_sample) -> tuple[dict, dict]:
    """The iterations from the state's to `total`: steps, metrics, samples, evaluations, checkpoints,
    NaN-streak stops, and SIGTERM / SIGINT (Ctrl-C) stops, both of which save a checkpoint after the
    current iteration. Returns (loss per iteration, the last metrics, the stopping signal or None)."""
    c, main = run.c, dist.is_main_process()
    first = int(run.state.iteration)
    writer = MetricsWriter(run.workdir, enabled=main)
    log = _Log(run, writer)
    if evaluator is not None and first == 0 and total > 0:
        _evaluate(run, evaluator, 0, main)
    stop = {"signal": None}
    stop_signals = (signal.SIGTERM, signal.SIGINT)
    old_handlers = {s: signal.signal(s, lambda s, f: stop.update(signal=s)) for s in stop_signals}
    bar = tqdm(
        range(first, total),
        initial=first,
        total=total,
        desc=c.mode,
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    try:
        for it in bar:
            run.state, m = step_fn(it)(run.state, run.frozen, run.batch(it), run.key(it))
            log.pending.append((it, m))
            done = it + 1
            # Read once per iteration: a signal arriving from here on stops after the next iteration,
            # never between this iteration's save decision and its stop.
            stopping = stop["signal"] is not None
            if jax.process_count() > 1:
                stopping = dist.any_process(stopping)  # every process saves the same checkpoint
                if stopping and stop["signal"] is None:
                    stop["signal"] = "on another process"
            due = _due(c, done, total, stopping)
            if any(due.values()) or len(log.pending) >= c.max_nan_streak:
                log.sync(it)
            if due["log"]:
                log.write(done, bar)
            if due["sample"] and on_sample is not None:
                params = dist.to_host(run.state.params)
                if main:
                    on_sample(run, params, done)
            if evaluator is not None and due["eval"]:
                _evaluate(run, evaluator, done, main)
            if due["save"]:
                run.ckpts.save(done, run.state, {**run.meta, "iteration": done}, force=True)
            if stopping:
                name = signal.Signals(stop["signal"]).name if isinstance(stop["signal"], int) else stop["signal"]
                dist.log(f"stopped by {name}: checkpoint saved at iteration {done}")
                break
    finally:
        run.ckpts.close()
        writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    stopped = stop["signal"]
    return log.losses, log.last, int(stopped) if isinstance(stopped, int) else (signal.SIGTERM if stopped else None)


def _due(c, done: int, total: int, stopping: bool) -> dict:
    """Which periodic actions iteration `done` (1-based) triggers."""
    end = done == total
    every = lambda n: bool(n) and done % n == 0
    return dict(
        log=every(c.log_every) or end,
        sample=bool(c.get("sample_every", 0)) and (every(c.sample_every) or end),
        eval=every(int(c.get("eval_every", 0) or 0)) or end,
        save=every(c.checkpoint.every) or end or stopping,
    )


class _Log:
    """Device metrics kept until a sync point (one host transfer), then losses, the last metrics
    and a NaN-streak check; `write` sends them to the metrics files and the progress bar."""

    def __init__(self, run: Run, writer: MetricsWriter):
        self.run, self.writer = run, writer
        self.pending, self.losses, self.last = [], {}, {}

    def sync(self, it: int) -> None:
        for i, m in jax.device_get(self.pending):
            self.losses[i] = float(m["loss"])
            self.last = {k: float(v) for k, v in m.items()}
        self.pending.clear()
        state, ckpts = self.run.state, self.run.ckpts
        if int(state.nan_streak) >= self.run.c.max_nan_streak:
            ckpts.wait()
            raise NanStreakError(
                f"{int(state.nan_streak)} non-finite steps in a row at iteration {it}; "
                f"stopping (state before them is in {ckpts.dir})"
            )

    def write(self, done: int, bar) -> None:
        state = self.run.state
        self.writer.write(done, {**self.last, "nan_skips": int(state.nan_skips), "step": int(state.step)})
        bar.set_postfix(loss=f"{self.losses[done - 1]:.4g}", step=int(state.step), skips=int(state.nan_skips))


def _evaluate(run: Run, evaluator, iteration: int, main: bool) -> None:
    res = evaluator(iteration, run.state)
    if main:
        with open(os.path.join(run.workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps({"iteration": iteration, **res}) + "\n")


def export(run: Run, trained: bool = True) -> None:
    """The weights (EMA with `c.export_ema`) as an NNX checkpoint in `workdir/export`, also after
    a stop, so a cut run still leaves usable weights. A rerun that trained nothing keeps the
    existing export (its fingerprint identifies the next stage's initialisation)."""
    c = run.c
    path = os.path.join(run.workdir, "export")
    if not c.get("export", True) or (not trained and os.path.exists(os.path.join(path, "wan_config.json"))):
        return
    weights = dist.to_host(run.state.ema if c.get("export_ema", False) else run.state.params)
    if dist.is_main_process():
        rs.export_model(run.model, weights, path)
    dist.barrier("export written")  # the next stage may read it on any process


def model_batch(batch: dict) -> dict:
    """The part of a source batch the steps consume (drops scoring-only fields)."""
    return {k: v for k, v in batch.items() if k in ("latents", "context", "actions", "ode_traj", "ode_times")}
