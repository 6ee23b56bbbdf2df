"""The embedded end-to-end demo: the whole Causal-rCM recipe on the toy world, on a CPU.

  python -m crm_jax.main --config=configs/toy_demo.py --workdir=runs/demo

1. load the small causal toy teacher shipped in `crm_jax/assets/toy_teacher` (trained by
   `configs/toy_teacher_tf.py`, command in docs/benchmarks.md);
2. generate a synthetic set with it (chunk-wise Euler + CFG from toy prompts/actions);
3. TF-sCM: distil a few-step causal student from the teacher on that set;
4. SF-DMD: refine the student on its own rollouts against the teacher (critic = teacher);
5. stream world-model rollouts (first block of real frames given, then actions only)
   with the teacher and with the student at 1 and 2 steps per chunk, score them against
   the simulator (trajectory error, action following, time per frame), write a GIF
   and a metrics table to the workdir.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import signal
import threading
import time

import jax
import numpy as np

from crm_jax import distributed as dist
from crm_jax import pipeline
from crm_jax.config_files import load_config
from crm_jax.data.generate import generate
from crm_jax.data.sources import make_source
from crm_jax.data.toy_latents import latents_to_frames
from crm_jax.data.toy_source import ToySource
from crm_jax.evaluation import world_model as wm
from crm_jax.models import convert
from crm_jax.models.wan import AttentionPattern, functional
from crm_jax.sampling.causal import causal_sample
from crm_jax.training import run_setup

# The synthetic set's generation config (relative paths: under the repository root).
GENERATION_CONFIG = "configs/toy_generate.py"


def _pattern(c) -> AttentionPattern:
    return AttentionPattern("block_causal", c.train.block_frames, c.train.first_block_frames)


def generation_config(c, src: ToySource):
    """The `crm_jax.data.generate` config of the demo's synthetic set (causal teacher, chunk-wise)."""
    g = load_config(c.demo.get("generation_config", GENERATION_CONFIG))
    g.model.overrides = copy.deepcopy(c.model.overrides)
    g.teacher = c.demo.teacher
    g.num_samples = c.demo.synthetic_samples
    g.samples_per_shard = max(16, c.demo.synthetic_samples // 4)
    g.batch_size = c.data.batch_size
    g.latent_shape = src.latent_shape
    g.cond.height, g.cond.width = src.world.height, src.world.width
    g.pattern.kind = "block_causal"
    g.pattern.block_frames = c.train.block_frames
    g.sampler.num_steps = c.demo.teacher_steps
    g.sampler.guidance = c.train.guidance
    return g


def evaluate(c, model, src: ToySource, *, method: str, steps: int, episodes: int, key) -> dict:
    """World-model rollouts from the first real block + actions, scored by the simulator."""
    apply, params = functional(model)
    pat = _pattern(c)
    prefix_frames = pat.first
    src = dataclasses.replace(src, batch_size=episodes)
    batch = src.batch(50_000)  # held-out episodes (training draws steps < 50_000)
    lat, acts = batch["latents"][:episodes], batch["actions"][:episodes]
    kw = dict(
        pattern=pat,
        num_frames=src.world.num_frames,
        latent_hw=src.latent_shape[1:3],
        method=method,
        steps=steps,
        guidance=c.train.guidance if method == "euler" else 1.0,
        neg_context=src.negative_context(),
        actions=acts,
        prefix=lat[:, :prefix_frames],
    )
    ctx = batch["context"][:episodes]
    x = causal_sample(apply, params, model.cfg, key, ctx, **kw)
    jax.block_until_ready(x)
    t0 = time.perf_counter()
    x = causal_sample(apply, params, model.cfg, jax.random.fold_in(key, 1), ctx, **kw)
    jax.block_until_ready(x)
    gen_frames = src.world.num_frames - prefix_frames
    per_frame_ms = (time.perf_counter() - t0) / (gen_frames * episodes) * 1e3
    frames = np.asarray(latents_to_frames(x, src.factor))
    truth = np.asarray(latents_to_frames(lat, src.factor))
    episodes_batch = {k: batch[k][:episodes] for k in ("states", "colors", "actions")}
    s = wm.score(frames, episodes_batch, src.world, prefix_frames, truth_frames=truth)
    return dict(
        trajectory_error=float(np.mean(s["trajectory_error"])),
        action_following=float(np.mean(s["action_following"])),
        background_error=float(np.mean(s["background_error"])),
        drift_by_frame=np.mean(s["drift"], 0).round(3).tolist(),
        ms_per_frame=round(per_frame_ms, 2),
        frames=frames,
        truth=truth,
    )


def _stage_config(c, mode: str, workdir: str, iterations: int, **train):
    s = copy.deepcopy(c)
    with s.unlocked():
        s.mode = mode
        s.num_iterations = iterations
        s.data.kind = "dataset"
        s.data.path = os.path.join(workdir, "synthetic")
        for k, v in train.items():
            s.train[k] = v
    return s


def write_gif(path: str, rows: list[np.ndarray], scale: int = 4) -> None:
    """rows: list of `[T, H, W, 3]` videos in [0, 1], stacked vertically per frame, upscaled."""
    from crm_jax.sampling.video import VideoWriter

    frames = np.concatenate(rows, axis=1)  # [T, sum H, W, 3]
    with VideoWriter(path, fps=4) as w:
        w.append(np.repeat(np.repeat(frames, scale, 1), scale, 2))


def run_demo(c, workdir: str) -> dict:
    """The five stages of the demo in `workdir`; returns the metrics summary. SIGTERM or SIGINT
    ends the demo at the stage it arrives in with `Stopped`; every stage resumes on a rerun."""
    t_all = time.time()
    os.makedirs(workdir, exist_ok=True)
    with _stage("loading the teacher"):
        teacher = _load_teacher(c)
        mcfg = run_setup.model_config(c)
        src = dataclasses.replace(make_source(c, mcfg), process_index=0, process_count=1)  # whole batches
    dist.log(f"[1/5] teacher loaded from {c.demo.teacher}")
    timings = {}
    synth = os.path.join(workdir, "synthetic")
    with _stage("the synthetic set"), _timed(timings, "synthetic_s"):
        generate(generation_config(c, src), synth)  # resumable: a rerun skips finished shards
    dist.log(f"[2/5] synthetic set: {c.demo.synthetic_samples} teacher videos -> {synth} ({timings['synthetic_s']} s)")
    exports = _distil(c, workdir, timings)
    with _stage("the evaluation"):
        with _timed(timings, "eval_s"):
            rows = _evaluate_all(c, teacher, src, exports)
        timings["total_s"] = round(time.time() - t_all, 1)
        return _report(workdir, rows, timings)


class Stopped(Exception):
    """A stage was stopped by a signal (a training stage's checkpoint and export are saved): the demo ends there."""

    def __init__(self, stage: str, signum: int):
        super().__init__(f"demo: {stage} stopped by {signal.Signals(signum).name}; rerun the demo to resume it")
        self.stage, self.signum = stage, signum


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stage(name: str):
    """SIGTERM / SIGINT during the block end it with `Stopped(name)`. A training stage's loop
    takes the signals over while it iterates (it stops after a checkpoint); the synthetic set
    writes whole shards and the evaluation reruns in full, so interrupting them loses nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    finished, pending = [False], []

    def interrupt(signum, frame):
        if finished[0]:
            pending.append(signum)  # arrived as the stage ended: it stops the demo after it
        else:
            raise _Signalled(signum)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
        finished[0] = True
    except _Signalled as e:
        raise Stopped(name, e.signum) from None
    finally:
        finished[0] = True
        for s, h in old.items():
            signal.signal(s, h)
    if pending:
        raise Stopped(name, pending[0])


def _train_stage(c, workdir: str, stage: str) -> None:
    with _stage(stage):
        out = pipeline.train(c, workdir)
    if out["stopped_by"] is not None:
        raise Stopped(stage, int(out["stopped_by"]))


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    t0 = time.time()
    yield
    timings[name] = round(time.time() - t0, 1)


def _load_teacher(c):
    """The shipped toy teacher (NNX model), checked against the demo's model config."""
    if not os.path.isdir(c.demo.teacher):
        raise FileNotFoundError(
            f"toy teacher {c.demo.teacher!r} not found; train one with "
            f"`python -m crm_jax.main --config=configs/toy_teacher_tf.py --workdir=runs/toy_teacher` "
            f"and pass --config.demo.teacher=runs/toy_teacher/export"
        )
    teacher = convert.load_nnx(c.demo.teacher)
    mcfg = run_setup.model_config(c)
    if teacher.cfg != mcfg:
        raise ValueError(f"shipped teacher config {teacher.cfg} differs from the demo's model config {mcfg}")
    return teacher


def _distil(c, workdir: str, timings: dict) -> dict:
    """TF-sCM from the teacher on the synthetic set, then SF-DMD from that student; returns
    {student name: export directory}."""
    scm_dir = os.path.join(workdir, "tf_scm")
    cs = _stage_config(c, "tf_scm", workdir, c.demo.scm_iterations, lr=c.demo.scm_lr)
    cs.init.teacher = c.demo.teacher
    cs.init.student = c.demo.teacher
    with _timed(timings, "tf_scm_s"):
        _train_stage(cs, scm_dir, "TF-sCM")
    dist.log(f"[3/5] TF-sCM student -> {scm_dir}/export ({timings['tf_scm_s']} s)")
    dmd_dir = os.path.join(workdir, "sf_dmd")
    cd = _stage_config(c, "sf_dmd", workdir, c.demo.dmd_iterations, lr=c.demo.dmd_lr, critic_lr=c.demo.dmd_lr)
    cd.init.teacher = c.demo.teacher
    cd.init.student = os.path.join(scm_dir, "export")
    with _timed(timings, "sf_dmd_s"):
        _train_stage(cd, dmd_dir, "SF-DMD")
    dist.log(f"[4/5] SF-DMD student -> {dmd_dir}/export ({timings['sf_dmd_s']} s)")
    return {"TF-sCM": os.path.join(scm_dir, "export"), "TF-sCM + SF-DMD": os.path.join(dmd_dir, "export")}


def _evaluate_all(c, teacher, src: ToySource, exports: dict) -> dict:
    """World-model rollouts of the teacher (Euler) and of each student at 1 and 2 steps."""
    key = jax.random.key(c.seed + 99)
    n = c.demo.eval_episodes
    rows = {
        f"teacher (Euler, {c.demo.teacher_steps} steps)": evaluate(
            c, teacher, src, method="euler", steps=c.demo.teacher_steps, episodes=n, key=key
        )
    }
    for name, path in exports.items():
        student = convert.load_nnx(path)
        for steps in (1, 2):
            rows[f"{name}, {steps} step{'s' if steps > 1 else ''}"] = evaluate(
                c, student, src, method="consistency", steps=steps, episodes=n, key=key
            )
    return rows


def _report(workdir: str, rows: dict, timings: dict) -> dict:
    """The GIF, the metrics table (markdown + JSON) and the log lines; returns the summary."""
    first = next(iter(rows.values()))
    gif = os.path.join(workdir, "demo.gif")
    vids = [first["truth"][0]] + [r["frames"][0] for r in rows.values()]
    main = dist.is_main_process()  # several processes: each evaluates, process 0 writes
    if main:
        write_gif(gif, vids)
    table = [
        "| model | trajectory error (px) | action following | background error | ms / frame (CPU) |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        table.append(
            f"| {name} | {r['trajectory_error']:.3f} | {r['action_following']:.2f} | {r['background_error']:.3f} "
            f"| {r['ms_per_frame']} |"
        )
    summary = {name: {k: v for k, v in r.items() if k not in ("frames", "truth")} for name, r in rows.items()}
    summary["timings"] = dict(timings)
    if main:
        with open(os.path.join(workdir, "demo_metrics.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(workdir, "demo_metrics.md"), "w") as f:
            f.write("\n".join(table) + "\n")
    dist.log("[5/5] world-model rollouts (first block given, then actions), scored against the simulator:")
    dist.log("\n".join(table))
    dist.log(f"video (rows: ground truth, {', '.join(rows)}): {gif}")
    dist.log(f"metrics: {os.path.join(workdir, 'demo_metrics.md')}, {os.path.join(workdir, 'demo_metrics.json')}")
    dist.log(f"total {timings['total_s']} s")
    return summary
