"""The training program behind `python -m crm_jax.main` (modes of `crm_jax.training.steps`).

Builds the models from the config (random init or converted checkpoints), the
mesh and shardings, restores `--workdir` if it holds a compatible checkpoint, then
runs iterations with a progress bar, JSONL + TensorBoard metrics, periodic and
SIGTERM checkpoints, and NaN skipping (stop after `max_nan_streak` in a row).

Several processes (`crm_jax.distributed`) run the same program: each reads only its rows of
every global batch, all save and restore the Orbax checkpoints together and must agree on the
step they resume from, and process 0 alone writes the metrics, TensorBoard events, progress
bar, samples, evaluations and the export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from crm_jax import distributed as dist
from crm_jax.data import toy_world as tw
from crm_jax.data.toy_source import ToySource
from crm_jax.inputs import check_inputs, training_inputs
from crm_jax.models import convert
from crm_jax.models.config import RUNTIME_FIELDS, WanConfig, model_config_from, same_architecture
from crm_jax.models.wan import apply_for, functional, init_model
from crm_jax.training import sharding as shd
from crm_jax.training.checkpoints import Checkpoints, abstract_like
from crm_jax.training.offload import make_step, place_frozen, precompile
from crm_jax.training.steps import Frozen, TrainConfig, Trainer


class NanStreakError(RuntimeError):
    pass


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


WORLD_KEYS = ("num_frames", "height", "width", "num_sprites", "sprite_size", "action_speed", "max_speed")


def toy_world_config(c) -> tw.ToyWorldConfig:
    return tw.ToyWorldConfig(**{k: c.data[k] for k in WORLD_KEYS if k in c.data})


def make_source(c, mcfg: WanConfig):
    """The training batches: the on-the-fly toy world or a generated dataset directory."""
    if c.data.kind == "dataset":
        from crm_jax.data.dataset import DatasetSource

        src = DatasetSource(c.data.path, c.data.batch_size, seed=c.data.seed, mcfg=mcfg)
        want = c.data.get("latent_shape")
        have = tuple(src.meta["features"]["latents"]["shape"])
        if want and tuple(want) != have:
            raise ValueError(
                f"data.latent_shape={tuple(want)} but the dataset {c.data.path!r} holds latents "
                f"of shape {have}: set --config.data.latent_shape={','.join(map(str, have))}"
            )
        return src
    if c.data.kind != "toy":
        raise ValueError(f"unknown data.kind {c.data.kind!r} (known: 'toy', 'dataset')")
    world = toy_world_config(c)
    src = ToySource(
        world,
        c.data.batch_size,
        mcfg.text_len,
        mcfg.text_dim,
        seed=c.data.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    if src.latent_shape[-1] != mcfg.in_channels:
        raise ValueError(
            f"toy latents have {src.latent_shape[-1]} channels but the model expects in_channels={mcfg.in_channels}"
        )
    return src


def load_params(path: str, mcfg: WanConfig, seed: int):
    """Parameters from a checkpoint directory, or a random init when `path` is empty."""
    if not path:
        return functional(init_model(mcfg, seed))[1]
    model = convert.load_any(path)
    if not same_architecture(model.cfg, mcfg):
        raise ValueError(f"checkpoint {path} has model config {model.cfg}, expected {mcfg}")
    return functional(model)[1]


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


def run_meta(c, mcfg: WanConfig) -> dict:
    return {"mode": c.mode, "model": dataclasses.asdict(mcfg)}


def train(c, workdir: str, *, max_iterations: int | None = None, progress: bool = True, evaluator=None) -> dict:
    """Run (or resume) training. Returns a summary dict (final metrics, losses per iteration).

    `evaluator(iteration, state) -> dict` (optional) runs before the first iteration of a fresh
    run, every `c.eval_every` iterations and at the end (on every process); its results are
    appended to `workdir/eval.jsonl` as `{"iteration": i, **result}` (by process 0)."""
    mcfg = model_config(c)
    tcfg = train_config(c)
    mesh = shd.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.get("context", 1))
    shd.check_batch(c.data.batch_size, mesh)  # config errors before the workdir is touched
    threads = int(c.get("precompile", 0))
    if threads < -1:
        raise ValueError(f"precompile must be -1 (lazily), 0 (all at once) or N > 0 at a time, got {threads}")
    check_inputs(training_inputs(c), f"{c.mode} config")  # missing checkpoints / dataset: same
    meta = run_meta(c, mcfg)
    os.makedirs(workdir, exist_ok=True)
    ckpts = Checkpoints(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.get("async_save", True))
    start_step = ckpts.check_compatible(meta)  # raises before any compute on mismatch
    found = dist.agree(-1 if start_step is None else start_step, f"the checkpoint step to resume from in {ckpts.dir}")
    start_step = None if found < 0 else found

    src = make_source(c, mcfg)
    model = init_model(mcfg, c.seed)
    apply, params = functional(model)
    if c.init.student:
        params = load_params(c.init.student, mcfg, c.seed)
    teacher_cfg = teacher_model_config(c, mcfg)
    same_arch = teacher_cfg == mcfg
    trainer = Trainer(tcfg, apply, mcfg, teacher_apply=None if same_arch else apply_for(teacher_cfg))
    frozen = None
    if tcfg.needs_teacher:
        if not c.init.teacher and not c.init.get("allow_random_teacher", False):
            raise ValueError(f"mode {c.mode!r} needs init.teacher (a checkpoint directory)")
        teacher = load_params(c.init.teacher, teacher_cfg, c.seed + 1)
        dmd_teacher = load_params(c.init.dmd_teacher, teacher_cfg, c.seed + 2) if c.init.get("dmd_teacher") else teacher
        frozen = Frozen(teacher, dmd_teacher, src.negative_context())
        if mcfg.mean_flow and not c.init.student:
            if teacher_cfg != mcfg.replace(mean_flow=False):
                raise ValueError(
                    "a MeanFlow student is initialised from its teacher, so it needs the "
                    "teacher's architecture (or init.student)"
                )
            params = _mean_flow_from(teacher, params)
    elif tcfg.cond_dropout > 0:
        frozen = Frozen(None, None, src.negative_context())
    critic = frozen.dmd_teacher if tcfg.has_critic else None
    state = trainer.init_state(params, critic)

    offload = offload_fields(c)
    if offload:
        dist.log(
            f"memory.offload: {', '.join(offload)} in pinned host memory; each step runs as teacher "
            f"pass / main step / EMA update (crm_jax/training/offload.py)"
        )
    st_sh = shd.state_shardings(state, mesh, offload=tuple(f for f in offload if f == "ema"))
    fr_sh = (
        shd.state_shardings(frozen, mesh, offload=tuple(f for f in offload if f != "ema"))
        if frozen is not None
        else None
    )
    if start_step is not None:  # restored into device memory, then placed like a fresh state
        state, old_meta = ckpts.restore(start_step, abstract_like(state, shd.state_shardings(state, mesh)))
        dist.log(f"resumed from {ckpts.dir}/{start_step} (iteration {int(state.iteration)})")
    state = shd.global_put(state, st_sh)
    if frozen is not None:
        frozen = place_frozen(frozen, fr_sh)

    example = _model_batch(src.batch(0))
    b_sh = shd.batch_shardings(example, mesh, c.data.batch_size)
    key_sh = shd.replicated(jax.random.key(0), mesh)
    global_batch = lambda it: shd.global_batch(_model_batch(src.batch(it)), b_sh, c.data.batch_size)
    in_sh = (st_sh, fr_sh, b_sh, key_sh)

    @functools.cache
    def compiled(which: str, sf_steps: int, use_dmd: bool):
        """One jitted step per (kind, self-forcing steps, dmd on/off); shardings fixed. With
        offloaded fields it is split into jits that keep them off the device (`offload.make_step`)."""
        return make_step(trainer, mesh, in_sh, which, sf_steps=sf_steps, use_dmd=use_dmd)

    total = c.num_iterations if max_iterations is None else min(c.num_iterations, max_iterations)
    first = int(state.iteration)
    main = dist.is_main_process()
    writer = MetricsWriter(workdir, enabled=main)
    eval_every = int(c.get("eval_every", 0) or 0)

    def run_eval(it):
        res = evaluator(it, state)
        if main:
            with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
                f.write(json.dumps({"iteration": it, **res}) + "\n")

    plans = sorted({trainer.plan(it, tcfg.student_update_freq) for it in range(first, total)})
    if len(plans) > 1 and threads >= 0:
        secs = precompile(
            [compiled(*p) for p in plans],
            state,
            frozen,
            global_batch(first),
            shd.global_put(jax.random.key(c.seed), key_sh),
            threads=threads or None,
        )
        dist.log(
            f"compiled {len(plans)} step functions ({', '.join(f'{w}/{n} steps' for w, n, _ in plans)}), "
            f"{threads or len(plans)} at a time, in {secs:.0f} s"
        )
    if evaluator is not None and first == 0 and total > 0:
        run_eval(0)
    stop = {"signal": None}
    old_handler = signal.signal(signal.SIGTERM, lambda s, f: stop.update(signal=s))
    base_key = jax.random.key(c.seed)
    losses, last_metrics = {}, {}
    bar = tqdm(
        range(first, total),
        initial=first,
        total=total,
        desc=c.mode,
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    t_start = time.time()
    multi = jax.process_count() > 1
    try:
        pending = []  # (iteration, device metrics): fetched at sync points, not every step

        def sync(it):
            """Fetch pending metrics (one host sync) and stop on a run of non-finite steps."""
            nonlocal last_metrics
            for i, m in jax.device_get(pending):
                losses[i] = float(m["loss"])
                last_metrics = {k: float(v) for k, v in m.items()}
            pending.clear()
            if int(state.nan_streak) >= c.max_nan_streak:
                ckpts.wait()
                raise NanStreakError(
                    f"{int(state.nan_streak)} non-finite steps in a row at iteration {it}; "
                    f"stopping (state before them is in {ckpts.dir})"
                )

        for it in bar:
            batch = global_batch(it)
            key = shd.global_put(jax.random.fold_in(base_key, it), key_sh)
            which, sf_steps, use_dmd = trainer.plan(it, tcfg.student_update_freq)
            state, m = compiled(which, sf_steps, use_dmd)(state, frozen, batch, key)
            pending.append((it, m))
            done = it + 1
            log = done % c.log_every == 0 or done == total
            sample = c.get("sample_every", 0) and (done % c.sample_every == 0 or done == total)
            if multi and dist.any_process(stop["signal"] is not None) and stop["signal"] is None:
                stop["signal"] = "on another process"  # every process saves the same checkpoint
            save = done % c.checkpoint.every == 0 or done == total or stop["signal"] is not None
            if log or sample or save or len(pending) >= c.max_nan_streak:
                sync(it)
            if log:
                writer.write(done, {**last_metrics, "nan_skips": int(state.nan_skips), "step": int(state.step)})
                bar.set_postfix(loss=f"{losses[it]:.4g}", step=int(state.step), skips=int(state.nan_skips))
            if sample:
                params = dist.to_host(state.params)
                if main:
                    write_sample(c, mcfg, apply, params, src, workdir, done)
            if evaluator is not None and ((eval_every and done % eval_every == 0) or done == total):
                sync(it)
                run_eval(done)
            if save:
                ckpts.save(done, state, {**meta, "iteration": done}, force=True)
            if stop["signal"] is not None:
                dist.log(f"received signal {stop['signal']}: checkpoint saved at iteration {done}, exiting")
                break
    finally:
        ckpts.close()
        writer.close()
        signal.signal(signal.SIGTERM, old_handler)
    if c.get("export", True):  # also after a stop, so a cut run still leaves usable weights
        weights = dist.to_host(state.ema if c.get("export_ema", False) else state.params)
        if main:
            export_model(model, weights, os.path.join(workdir, "export"))
        dist.barrier("export written")  # the next stage may read it on any process
    return dict(
        losses=losses,
        metrics=last_metrics,
        iteration=int(state.iteration),
        step=int(state.step),
        nan_skips=int(state.nan_skips),
        seconds=time.time() - t_start,
        state=state,
    )


def write_sample(c, mcfg, apply, params, src, workdir: str, iteration: int) -> str:
    """A sample video of the current model in `workdir/samples/` (GIF for the toy world,
    latents `.npz` otherwise). Causal models get the first block of a held-out batch and its
    actions and generate the rest (2-step consistency sampling for students, 16-step Euler
    for teachers); bidirectional teachers generate the whole clip with Euler."""
    from crm_jax.sampling.causal import causal_sample

    tcfg = train_config(c)
    batch = src.batch(10**6)
    n = min(2, c.data.batch_size)
    lat, ctx = batch["latents"][:n], batch["context"][:n]
    acts = batch.get("actions")
    acts = None if acts is None else acts[:n]
    teacher_mode = c.mode.startswith("teacher")
    method, steps = ("euler", 16) if teacher_mode else ("consistency", 2)
    pat = tcfg.pattern("block_causal")
    if c.mode == "teacher_full":
        x = diffusion_euler_full(apply, params, mcfg, lat, ctx, acts)
    else:
        x = causal_sample(
            apply,
            params,
            mcfg,
            jax.random.key(iteration),
            ctx,
            pattern=pat,
            num_frames=lat.shape[1],
            latent_hw=lat.shape[2:4],
            method=method,
            steps=steps,
            actions=acts,
            prefix=lat[:, : pat.first],
        )
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    if isinstance(src, ToySource):
        from crm_jax.data.toy_latents import latents_to_frames
        from crm_jax.sampling.video import VideoWriter

        frames = np.concatenate(
            [np.asarray(latents_to_frames(lat, src.factor)), np.asarray(latents_to_frames(x, src.factor))], axis=2
        )  # truth | sample
        path = os.path.join(workdir, "samples", f"iter_{iteration:07d}.gif")
        with VideoWriter(path, fps=4) as w:
            w.append(frames[0])
        return path
    path = os.path.join(workdir, "samples", f"iter_{iteration:07d}.npz")
    np.savez(path, latents=np.asarray(x))
    return path


def diffusion_euler_full(apply, params, mcfg, lat, ctx, acts):
    from crm_jax import diffusion as D
    from crm_jax.training import nets

    fn = nets.velocity_fn(apply, params, TrainConfig(mode="teacher_full").pattern("full"))
    cond = {"context": ctx} if acts is None else {"context": ctx, "actions": acts}
    return D.euler_sample(fn, jax.random.normal(jax.random.key(0), lat.shape), cond, num_steps=16)


def export_model(model, params, path: str) -> None:
    """Write `params` into `model`'s structure as a crm_jax NNX checkpoint (teacher/student input)."""
    from flax import nnx

    params = jax.tree.map(lambda p, ref: jnp.asarray(p, ref.dtype), jax.device_get(params), nnx.state(model, nnx.Param))
    nnx.update(model, params)
    convert.save_nnx(model, path)


def _model_batch(batch: dict) -> dict:
    """The part of a source batch the steps consume (drops scoring-only fields)."""
    return {k: v for k, v in batch.items() if k in ("latents", "context", "actions", "ode_traj", "ode_times")}


def _mean_flow_from(teacher, params):
    """Initialise a MeanFlow student from an RF teacher: copy shared parameters, keep the
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
