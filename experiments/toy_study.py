"""The small-scale study of Causal-rCM's claims on the toy world (issue 9).

    python experiments/toy_study.py --workdir runs/toy_study                      # everything (GPU)
    python experiments/toy_study.py --workdir runs/toy_study --only prep          # teachers + classifier
    python experiments/toy_study.py --workdir runs/toy_study --report experiments/results/toy_study

Jobs (a DAG; up to --parallel of them run at once, each in its own process; a job with a
`done.json` is skipped, and its own dependencies are not revisited, so a rerun resumes; every job
is deterministic given its seed; `--set KEY=VALUE` replaces one budget of the scale, e.g.
`--only dmd_causal --set dmd_iters=800`, and is recorded in each job's done.json; `--seed N` shifts
every training job's seeds, evaluation episodes fixed, for repeats in another workdir):

  classifier                 video classifier on simulator clips (the Fréchet-distance features)
  teacher_bi                 bidirectional teacher, flow matching on simulator clips
  teacher_c2, teacher_c1     causal teachers by teacher forcing, chunk-wise (2 frames) / frame-wise
  data                       synthetic set: teacher_bi's Euler + CFG samples with ODE points
  {tf_scm,tf_meanflow,tf_dcm}_{c2,c1}   causal students distilled from teacher_cX by teacher forcing
                             on simulator clips (the toy world is the synthetic dataset)
  ode_init_c2                ODE-regression initialisation (CausVid / Self-Forcing baseline) on
                             teacher_bi's ODE points (the data job)
  tf_scm_{c2,c1}_{nowarmup,nonorm,highnoise,seed1}, tf_dcm_{c2,c1}_seed1   (--only ablations) claim 1's
                             variants: TF-sCM without tangent warm-up, without normalising g, with
                             noisier training times; both methods again with seed 1
  dmd_{scm,dcm,ode,none,bidir}  SF-DMD refinement (real score: teacher_bi with CFG, critic from it)
                             from TF-sCM, TF-dCM, ODE regression, the causal teacher itself, or the
                             bidirectional teacher's weights (run block-causally)
  final_c2, final_c1         every finished model: short rollouts on more episodes and long
                             rollouts (4x the trained length, sliding window) for drift by frame
                             (incremental: with its done.json deleted, a final job evaluates only the
                             models that are new or retrained since, see `run_final`)
  final_teachers             the same for all teachers, diagnostic variants included (on demand)
  dmd_*_causal, final_dmd_causal   (on demand: --only dmd_causal) SF-DMD with the chunk-wise causal
                             teacher as the real score and critic init, block-causal, and its final
                             evaluation
  dmd_*_tf, final_dmd_tf     (on demand: --only dmd_tf) the same in the teacher's teacher-forcing
                             layout (each chunk scored with the rollout's clean earlier chunks)

Every model is scored by `crm_jax.evaluation.world_model`: the first 2 frames of a held-out
episode are given, the rest is generated from its actions, and the simulator's ground truth
gives trajectory error, action following and drift; the Fréchet distance uses the classifier.
Causal models are also rolled out from scratch (no frame given: `scratch{n}` / `euler_scratch`),
scored by action following and FD: given two frames the toy world is deterministic, from scratch
the first chunk is a real generative problem. Students are evaluated every `eval_every`
iterations at 1, 2 and 4 steps per chunk, both ways.

`--report DIR` (any machine, reads the workdir) writes tables (`study.md`), `study.json` and
PNG plots; `--repeats W1,W2` adds the SF-DMD results of workdirs run with other `--seed`s (claim 2
over seeds: mean, spread, wins per baseline). `--scale smoke` runs the whole DAG in minutes on a
CPU (tests/test_toy_study.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from crm_jax import distributed as dist  # noqa: E402

# Budgets. "full" is the GPU study; "smoke" exercises every code path on a CPU.
SCALES = {
    "full": dict(
        clf_steps=3000,
        clf_batch=128,
        teacher_iters=6000,
        teacher_batch=256,
        teacher_eval_every=1500,
        data_samples=2048,
        data_steps=32,
        student_iters=1000,
        student_batch=64,
        eval_every=100,
        dmd_iters=300,
        dmd_batch=32,
        dmd_eval_every=100,
        eval_episodes=256,
        final_episodes=256,
        long_frames=32,
        teacher_steps=16,
    ),
    "smoke": dict(
        clf_steps=2,
        clf_batch=4,
        teacher_iters=2,
        teacher_batch=4,
        teacher_eval_every=2,
        data_samples=8,
        data_steps=2,
        student_iters=2,
        student_batch=4,
        eval_every=1,
        dmd_iters=2,
        dmd_batch=2,
        dmd_eval_every=1,
        eval_episodes=4,
        final_episodes=4,
        long_frames=12,
        teacher_steps=2,
    ),
}
STEPS = (1, 2, 4)  # few-step sampling of students: steps per chunk
PREFIX = 2  # given ground-truth frames per rollout (a chunk, or 2 frames)
GUIDANCE = 2.0  # CFG of teachers (sampling, distillation targets, DMD real score)
TEACHER_SHIFT = 3.0  # Euler grid shift of teacher sampling
PATTERNS = {"c2": 2, "c1": 1}  # job suffix -> block_frames
# The study's model (every job: teachers, students, critics): a Wan of dim 192 (3 heads of 64) x 4
# layers, attention by XLA (at 2 x 8 x 16 tokens the Pallas kernels are slower: bench_toy_teacher.py).
# Teachers compute in bf16 (a 1.6x faster step than float32 on the H200), students in float32 (the sCM
# and MeanFlow tangents). Session 3's teachers were dim 128 x 3 layers in float32 (docs/benchmarks.md).
STUDY_MODEL = (("dim", 192), ("ffn_dim", 384), ("num_heads", 3), ("num_layers", 4), ("attn_impl", "xla"))
TEACHER_DTYPE = "bfloat16"
# SF-DMD's initialisations: the TF students, ODE regression, and two without distillation: the causal
# teacher's own weights ("none") and the bidirectional teacher's weights run block-causally ("bidir": the
# paper's "no init", a base model that was never causal).
DMD_INITS = {"scm": "tf_scm_c2", "dcm": "tf_dcm_c2", "ode": "ode_init_c2", "none": "teacher_c2", "bidir": "teacher_bi"}
# SF-DMD's real score (and critic init): the bidirectional teacher (default, as in Self Forcing) or, in
# jobs run on demand (`--only dmd_causal` / `--only dmd_tf`), the chunk-wise causal teacher, scoring
# every chunk block-causally with noised earlier chunks (`dmd_*_causal`: an input it was never trained
# on, experiments/dmd_real_score_check.py) or in its own teacher-forcing layout with the rollout's
# clean earlier chunks as context (`dmd_*_tf`). Session 5 found teacher_bi too poor a target.
DMD_REAL = {
    "bi": ("teacher_bi", "full"),
    "causal": ("teacher_c2", "block_causal"),
    "tf": ("teacher_c2", "teacher_forcing"),
}
DMD_ON_DEMAND = {real: tuple(f"dmd_{i}_{real}" for i in DMD_INITS) for real in DMD_REAL if real != "bi"}
TEACHER_VARIANTS = {  # diagnostics: the chunk-wise teacher with one change of its recipe
    "teacher_c2_small": dict(model=(("dim", 128), ("ffn_dim", 256), ("num_heads", 2), ("num_layers", 3))),
    "teacher_c2_lr5e-4": dict(lr=5e-4),
    "teacher_c2_f32": dict(model=(("dtype", "float32"),)),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A TF student with one change of its recipe, for claim 1 (why TF-sCM is or is not faster, and
    how much a second seed moves the curves). `train`: train-config overrides; the key `seed` is not
    one: it is added to the job's seeds (init noise, data order), a repeat of the method."""

    method: str  # tf_scm | tf_dcm
    block: int  # block frames (PATTERNS)
    train: tuple  # sorted (key, value) pairs
    about: str  # for tables and plots

    @property
    def suffix(self) -> str:
        return {b: s for s, b in PATTERNS.items()}[self.block]


def _variants() -> dict[str, Variant]:
    changes = {
        "nowarmup": (dict(tangent_warmup=0), "no tangent warm-up"),
        "nonorm": (dict(tangent_normalise=False), "g not normalised"),
        "highnoise": (dict(p_mean=0.7), "times LogNormal(0.7, 1.6), more noise"),
        "seed1": (dict(seed=1), "seed 1"),
    }
    out = {}
    for sfx, block in PATTERNS.items():
        for tag, (train, about) in changes.items():
            out[f"tf_scm_{sfx}_{tag}"] = Variant("tf_scm", block, tuple(sorted(train.items())), about)
        out[f"tf_dcm_{sfx}_seed1"] = Variant("tf_dcm", block, (("seed", 1),), "seed 1")
    return out


ABLATIONS = _variants()  # claim 1's variants: tf_{scm,dcm}_{c2,c1}_{tag}
DIAGNOSTICS = (
    tuple(TEACHER_VARIANTS)
    + ("final_teachers",)
    + tuple(  # only by --only
        j for real, jobs in DMD_ON_DEMAND.items() for j in jobs + (f"final_dmd_{real}",)
    )
)


# ----------------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    kind: str  # classifier | teacher | data | student | dmd | final
    deps: tuple[str, ...] = ()
    args: tuple = ()  # kind-specific, hashable


def _unique(*names: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def all_jobs() -> dict[str, Job]:
    jobs = [
        Job("classifier", "classifier"),
        Job("teacher_bi", "teacher", (), ("teacher_full", 1, ())),
        Job("data", "data", ("teacher_bi",)),
    ]
    for sfx, b in PATTERNS.items():
        jobs.append(Job(f"teacher_{sfx}", "teacher", (), ("teacher_tf", b, ())))
        for mode in ("tf_scm", "tf_meanflow", "tf_dcm"):
            jobs.append(Job(f"{mode}_{sfx}", "student", (f"teacher_{sfx}", "classifier"), (mode, b, ())))
    jobs.append(Job("ode_init_c2", "student", ("data", "teacher_c2", "classifier"), ("ode_init", 2, ())))
    for name, over in TEACHER_VARIANTS.items():
        jobs.append(Job(name, "teacher", (), ("teacher_tf", 2, tuple(sorted(over.items())))))
    for name, v in ABLATIONS.items():
        jobs.append(Job(name, "student", (f"teacher_{v.suffix}", "classifier"), (v.method, v.block, v.train)))
    for init, src in DMD_INITS.items():
        jobs.append(Job(f"dmd_{init}", "dmd", _unique(src, "teacher_bi", "teacher_c2", "classifier"), (src, "bi")))
        for real in DMD_ON_DEMAND:
            jobs.append(Job(f"dmd_{init}_{real}", "dmd", _unique(src, "teacher_c2", "classifier"), (src, real)))
    c1_models = (("teacher_c1", 1),) + tuple((f"{m}_c1", 1) for m in ("tf_scm", "tf_meanflow", "tf_dcm"))
    c2_models = (
        (("teacher_bi", 0), ("teacher_c2", 2))
        + tuple((f"{m}_c2", 2) for m in ("tf_scm", "tf_meanflow", "tf_dcm"))
        + (("ode_init_c2", 2),)
        + tuple((f"dmd_{i}", 2) for i in DMD_INITS)
    )
    for name, models in (("final_c1", c1_models), ("final_c2", c2_models)):
        jobs.append(Job(name, "final", tuple(m for m, _ in models) + ("classifier",), (models,)))
    # All teachers, the diagnostic variants included when they left an export (also a cut run's).
    teachers = (("teacher_bi", 0), ("teacher_c2", 2), ("teacher_c1", 1)) + tuple((v, 2) for v in TEACHER_VARIANTS)
    jobs.append(Job("final_teachers", "final", ("teacher_bi", "teacher_c2", "teacher_c1", "classifier"), (teachers,)))
    for real, dmd in DMD_ON_DEMAND.items():
        jobs.append(Job(f"final_dmd_{real}", "final", dmd + ("classifier",), (tuple((j, 2) for j in dmd),)))
    return {j.name: j for j in jobs}


GROUPS = {
    "prep": ("classifier", "teacher_bi", "teacher_c2", "teacher_c1"),
    "variants": tuple(TEACHER_VARIANTS),
    "ablations": tuple(ABLATIONS),
    **{f"dmd_{real}": dmd + (f"final_dmd_{real}",) for real, dmd in DMD_ON_DEMAND.items()},
}


# ----------------------------------------------------------------------------- shared setup

STUDENT_WEIGHTS = ("ema", "raw")  # what students (and SF-DMD) are evaluated and exported as


class Study:
    def __init__(
        self, workdir: str, scale: str, student_weights: str = "ema", overrides: dict | None = None, seed: int = 0
    ):
        """`overrides`: budgets of `SCALES[scale]` to replace (`--set KEY=VALUE`), e.g. {"dmd_iters": 1000}.
        `seed`: added to every training job's seeds (init, data order, noise); the classifier, the
        synthetic set and the evaluation episodes stay fixed, so studies of two seeds differ only in
        training (give each seed its own workdir)."""
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; known: {sorted(SCALES)}")
        if student_weights not in STUDENT_WEIGHTS:
            raise ValueError(f"student_weights must be one of {STUDENT_WEIGHTS}, got {student_weights!r}")
        self.overrides = dict(overrides or {})
        unknown = sorted(set(self.overrides) - set(SCALES[scale]))
        if unknown:
            raise ValueError(f"unknown budget(s) {unknown}; known: {sorted(SCALES[scale])}")
        bad = {k: v for k, v in self.overrides.items() if not isinstance(v, int) or v <= 0}
        if bad:
            raise ValueError(f"budgets are positive integers, got {bad}")
        self.workdir, self.scale, self.S = workdir, scale, {**SCALES[scale], **self.overrides}
        self.student_weights = student_weights

    def path(self, *p) -> str:
        return os.path.join(self.workdir, *p)

    def export(self, job: str) -> str:
        return self.path(job, "export")

    def base(self, mode: str, block: int, **model):
        from configs.base import base_config, toy_model

        c = base_config(mode, "tiny", **toy_model(**{**dict(STUDY_MODEL), **model}))
        c.train.update(block_frames=block, guidance=GUIDANCE, dmd_teacher_pattern="full")
        c.log_every = 50
        c.checkpoint.update(every=10**9, keep=1)  # the final checkpoint only (resume = rerun)
        return c

    @property
    def world(self):
        from crm_jax.data import sources

        return sources.toy_world_config(self.base("teacher_tf", 2))

    def world_of(self, frames: int):
        return dataclasses.replace(self.world, num_frames=frames)


def _evaluator(study: Study, c, *, kind: str, episodes: int, frames: int | None = None):
    """`evaluator(iteration, state)` for loop.train of config `c`: world-model rollouts at STEPS
    (students), Euler (causal teachers) or whole clips (bidirectional teacher), of the weights the
    job exports (the power EMA with `c.export_ema`, else the raw weights)."""
    import jax

    from crm_jax.evaluation import world_model as wm
    from crm_jax.evaluation.video_features import FeatureModel
    from crm_jax.models.wan import apply_for
    from crm_jax.training import run_setup

    block = c.train.block_frames
    mcfg = run_setup.model_config(c)
    src, batch = wm.heldout_source(
        study.world_of(frames or study.world.num_frames), mcfg.text_len, mcfg.text_dim, episodes
    )
    key = jax.random.key(2024)
    loaded = {}

    def features():
        """The classifier, once its job has finished (teachers train alongside it)."""
        if "fm" not in loaded and os.path.exists(study.path("classifier", "done.json")):
            loaded["fm"] = FeatureModel.load(study.path("classifier"))
        return loaded.get("fm")

    def evaluate(it, state):
        params = state.ema if c.get("export_ema", False) else state.params
        apply, feats = apply_for(mcfg), features()
        return {
            name: _strip(wm.evaluate(apply, params, mcfg, src, batch, key, features=feats, **kw))
            for name, kw in eval_settings(study, kind, block)
        }

    return evaluate


def eval_settings(study: Study, kind: str, block: int) -> list[tuple[str, dict]]:
    """How each kind of model is rolled out: [(setting name, `world_model.evaluate` keywords)].

    "full" (bidirectional teacher): whole clips, Euler + CFG; "teacher" (causal): the first
    PREFIX frames given, Euler + CFG; "student": the same prefix, consistency sampling at STEPS.
    Causal models are also rolled out from scratch (`*scratch*`: no frame given, only the prompt
    and the actions). Given two frames and the actions the toy world is deterministic; from
    scratch the first chunk is a real generative problem (where are the free sprites, which
    colours, which way do they move), the one where a few-step sampler must not average.
    """
    from crm_jax.models.wan import AttentionPattern

    euler = dict(method="euler", steps=study.S["teacher_steps"], guidance=GUIDANCE, shift=TEACHER_SHIFT)
    if kind == "full":
        return [("euler", dict(pattern=AttentionPattern("full"), prefix_frames=0, **euler))]
    given = dict(pattern=AttentionPattern("block_causal", block), prefix_frames=PREFIX)
    scratch = dict(given, prefix_frames=0)
    if kind == "teacher":
        return [("euler", dict(given, **euler)), ("euler_scratch", dict(scratch, **euler))]
    if kind != "student":
        raise ValueError(f"unknown model kind {kind!r}")
    return [(f"steps{n}", dict(given, method="consistency", steps=n)) for n in STEPS] + [
        (f"scratch{n}", dict(scratch, method="consistency", steps=n)) for n in STEPS
    ]


def _strip(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "frames"}


def seeded(study: Study, c):
    """Training config `c` (not modified) with the study's seed added to its model / noise and data seeds."""
    c = copy.deepcopy(c)
    c.seed, c.data.seed = c.seed + study.seed, c.data.seed + study.seed
    return c


def _train(study: Study, job: Job, c, evaluator):
    from crm_jax import pipeline

    t0 = time.time()
    c = seeded(study, c)
    if dist.is_main_process():  # several processes: process 0 writes the study's files
        with open(study.path(job.name, "config.json"), "w") as f:  # what ran, for the record
            f.write(c.to_json_best_effort(indent=1))
    out = pipeline.train(c, study.path(job.name), progress=False, evaluator=evaluator)
    if out["iteration"] < c.num_iterations:  # stopped by a signal: checkpoint saved, not done
        raise RuntimeError(
            f"{job.name} stopped at iteration {out['iteration']} of {c.num_iterations}; "
            f"rerun to resume from {study.path(job.name, 'checkpoints')}"
        )
    return dict(
        seconds=round(time.time() - t0, 1),
        iterations=out["iteration"],
        steps=out["step"],
        batch_size=int(c.data.batch_size),
        nan_skips=out["nan_skips"],
        final_metrics=out["metrics"],
    )


# ----------------------------------------------------------------------------- job kinds


def run_classifier(study: Study, job: Job) -> dict:
    import jax

    from crm_jax.evaluation.video_features import train_classifier

    t0 = time.time()
    m = train_classifier(study.world, steps=study.S["clf_steps"], batch_size=study.S["clf_batch"], seed=0)
    m.save(study.path(job.name))
    return dict(seconds=round(time.time() - t0, 1), heldout_accuracy=m.accuracy(jax.random.key(777), 512))


def teacher_config(study: Study, mode: str, block: int):
    """Teachers from scratch: configs/toy_teacher_*.py with Adam b1 = 0.9 (not docs/design.md's 0, a
    fine-tuning default), uniform times without the bell weight, the power EMA exported."""
    from configs.base import toy_teacher_config

    c = toy_teacher_config(mode)
    c.model.overrides.update(dict(STUDY_MODEL, dtype=TEACHER_DTYPE))
    c.train.update(block_frames=block, adam_b1=0.9, fm_weighting="none", fm_shift=1.0)
    if study.scale == "full":
        c.train.update(lr=1e-3, warmup_steps=500)
    c.export_ema = True
    c.num_iterations, c.data.batch_size = study.S["teacher_iters"], study.S["teacher_batch"]
    c.log_every, c.eval_every = 100, study.S["teacher_eval_every"]
    c.checkpoint.update(every=10**9, keep=1)
    return c


def run_teacher(study: Study, job: Job) -> dict:
    mode, block, over = job.args
    c = teacher_config(study, mode, block)
    over = dict(over)
    c.model.overrides.update(dict(over.pop("model", ())))
    if study.scale == "full":  # budgets of a variant (the smoke scale keeps its own)
        c.data.batch_size = over.pop("batch_size", c.data.batch_size)
        c.num_iterations = over.pop("num_iterations", c.num_iterations)
        c.eval_every = max(1, c.num_iterations // 5)
    over.pop("batch_size", None), over.pop("num_iterations", None)
    c.train.update(over)
    ev = _evaluator(study, c, kind="full" if mode == "teacher_full" else "teacher", episodes=study.S["eval_episodes"])
    return _train(study, job, c, ev)


def data_config(study: Study):
    """Synthetic set: teacher_bi's Euler samples (CFG) of simulator prompts/actions, with ODE points."""
    from configs.toy_generate import get_config

    w = study.world
    g = get_config()
    g.teacher = study.export("teacher_bi")
    g.model.overrides.update(dict(STUDY_MODEL))
    g.num_samples = study.S["data_samples"]
    g.samples_per_shard = max(4, g.num_samples // 8)
    g.batch_size = min(256, g.num_samples)
    g.latent_shape = (w.num_frames, w.height // 2, w.width // 2, 12)
    g.cond.update(height=w.height, width=w.width)
    g.sampler.update(num_steps=study.S["data_steps"], shift=TEACHER_SHIFT, guidance=GUIDANCE)
    g.ode.update(save=True, num_steps=4, sigma_max=80.0)
    return g


def run_data(study: Study, job: Job) -> dict:
    from crm_jax.data.generate import generate

    t0 = time.time()
    res = generate(data_config(study), study.path(job.name, "set"), progress=False)
    if not res["complete"]:
        raise RuntimeError(f"synthetic set incomplete: {res}")
    return dict(seconds=round(time.time() - t0, 1), samples=study.S["data_samples"])


def student_config(study: Study, mode: str, block: int, overrides=()):
    from configs.base import toy_student_config

    sfx = {2: "c2", 1: "c1"}[block]
    c = toy_student_config(mode, mean_flow=(mode == "tf_meanflow"), **dict(STUDY_MODEL))
    c.train.update(block_frames=block, guidance=GUIDANCE, **dict(overrides))
    c.num_iterations, c.data.batch_size = study.S["student_iters"], study.S["student_batch"]
    if mode == "ode_init":  # regression onto teacher_bi's ODE points; TF students see simulator clips
        c.data.update(kind="dataset", path=study.path("data", "set"))
    c.init.teacher = study.export(f"teacher_{sfx}")
    c.init.student = "" if mode == "tf_meanflow" else study.export(f"teacher_{sfx}")
    c.sample_every, c.log_every, c.eval_every = 0, 50, study.S["eval_every"]
    c.checkpoint.update(every=10**9, keep=1)
    c.export_ema = study.student_weights == "ema"  # like the teachers (session 4's run: raw)
    return c


def student_job_config(study: Study, job: Job):
    """The config of a student job (a `Variant`'s `seed` added to its seeds; the study's --seed is
    added later, by `seeded`)."""
    mode, block, over = job.args
    over = dict(over)
    repeat = over.pop("seed", 0)
    c = student_config(study, mode, block, over.items())
    c.seed, c.data.seed = c.seed + repeat, c.data.seed + repeat
    return c


def run_student(study: Study, job: Job) -> dict:
    c = student_job_config(study, job)
    return _train(study, job, c, _evaluator(study, c, kind="student", episodes=study.S["eval_episodes"]))


def dmd_config(study: Study, init_job: str, real: str = "bi"):
    """SF-DMD from `init_job`'s export; `real` (a `DMD_REAL` key): which teacher gives the real score
    (with CFG) and initialises the critic."""
    from configs.base import toy_student_config

    if real not in DMD_REAL:
        raise ValueError(f"real must be one of {sorted(DMD_REAL)}, got {real!r}")
    real_job, real_pattern = DMD_REAL[real]
    c = toy_student_config("sf_dmd", **dict(STUDY_MODEL))
    c.train.update(block_frames=2, guidance=GUIDANCE, dmd_teacher_pattern=real_pattern, sf_max_steps=4)
    c.num_iterations, c.data.batch_size = study.S["dmd_iters"], study.S["dmd_batch"]
    c.data.kind = "toy"
    c.init.update(
        student=study.export(init_job), teacher=study.export("teacher_c2"), dmd_teacher=study.export(real_job)
    )
    c.sample_every, c.log_every, c.eval_every = 0, 50, study.S["dmd_eval_every"]
    c.checkpoint.update(every=10**9, keep=1)
    c.export_ema = study.student_weights == "ema"
    return c


def run_dmd(study: Study, job: Job) -> dict:
    init_job, real = job.args
    c = dmd_config(study, init_job, real)
    return _train(study, job, c, _evaluator(study, c, kind="student", episodes=study.S["eval_episodes"]))


def run_final(study: Study, job: Job) -> dict:
    """Every listed model (job, block frames; 0 = bidirectional): short rollouts on more episodes
    and long rollouts (4x the trained length, sliding window); `final.json`, `long_rollouts.npz`.

    Incremental: a model already in this job's `final.json` whose `done.json` is unchanged since
    (`evaluated.json`) is kept, not evaluated again (every model is scored on the same episodes and
    key, so the order does not matter). To add models to a finished final job, delete its done.json.
    """
    import jax
    import numpy as np

    from crm_jax.data.toy_latents import latents_to_frames
    from crm_jax.evaluation import world_model as wm
    from crm_jax.evaluation.video_features import FeatureModel
    from crm_jax.models import convert
    from crm_jax.models.wan import functional
    from crm_jax.training import run_setup

    (models,) = job.args
    feats = FeatureModel.load(study.path("classifier"))
    mcfg = run_setup.model_config(study.base("teacher_tf", 2))
    key, t0, n_ep = jax.random.key(4242), time.time(), study.S["final_episodes"]
    short_src, short_batch = wm.heldout_source(study.world, mcfg.text_len, mcfg.text_dim, n_ep)
    long_src, long_batch = wm.heldout_source(study.world_of(study.S["long_frames"]), mcfg.text_len, mcfg.text_dim, n_ep)
    results, pictures, sources = _previous_final(study, job.name, [m for m, _ in models])
    for name, block in models:
        if not os.path.isdir(study.export(name)):
            print(f"{name}: no export, skipped", flush=True)
            continue
        source = _done_text(study, name)
        if name in sources and sources[name] == source:
            print(f"{name}: evaluated before (evaluated.json), kept", flush=True)
            continue
        for tag in [t for t in results if t.startswith(f"{name}/")]:  # retrained: evaluate it again
            results.pop(tag)
            pictures.pop(tag, None)
        model = convert.load_nnx(study.export(name))
        apply, params = functional(model)
        kind = "full" if block == 0 else ("teacher" if name.startswith("teacher") else "student")
        for setting, kw in eval_settings(study, kind, block):
            tag = f"{name}/{setting}"
            short = wm.evaluate(apply, params, model.cfg, short_src, short_batch, key, features=feats, **kw)
            if kw["prefix_frames"] == 0:  # whole clips of the trained length: no long rollout
                print(f"{tag}: follow {short['action_following']:.3f} fd {short['fd']:.2f}", flush=True)
                results[tag] = dict(short=_strip(short))
                continue
            long_kw = dict(kw, pattern=wm.long_rollout_pattern(kw["pattern"], study.world.num_frames))
            long = wm.evaluate(
                apply, params, model.cfg, long_src, long_batch, key, features=feats, keep_frames=4, **long_kw
            )
            pictures[tag] = long.pop("frames")
            results[tag] = dict(short=short, long=long)
            print(
                f"{tag}: short traj {short['trajectory_error']:.3f} fd {short['fd']:.2f} | long traj "
                f"{long['trajectory_error']:.3f} fd(last {feats.clip_frames}) {long['fd']:.2f}",
                flush=True,
            )
        sources[name] = source
    truth = np.asarray(latents_to_frames(long_batch["latents"][:4], short_src.factor))
    if dist.is_main_process():
        np.savez_compressed(
            study.path(job.name, "long_rollouts.npz"),
            truth=truth,
            **{k.replace("/", "__"): v for k, v in pictures.items()},
        )
        with open(study.path(job.name, "final.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(study.path(job.name, "evaluated.json"), "w") as f:
            json.dump(sources, f, indent=1)
    return dict(seconds=round(time.time() - t0, 1), models=[m for m, _ in models])


def _done_text(study: Study, name: str) -> str:
    path = study.path(name, "done.json")
    return open(path).read() if os.path.exists(path) else ""


def _previous_final(study: Study, name: str, models: list[str]) -> tuple[dict, dict, dict]:
    """(results, long-rollout pictures by tag, {model: its done.json text}) of an earlier run of final
    job `name`, for those of `models` it evaluated; empty when it has none. Models evaluated before
    `evaluated.json` existed are not trusted (no record of which weights they were) and are evaluated
    again; so is everything when the earlier run's files are incomplete or unreadable (said, not fatal)."""
    import numpy as np

    files = [study.path(name, f) for f in ("evaluated.json", "final.json", "long_rollouts.npz")]
    if not os.path.exists(files[0]):
        return {}, {}, {}
    try:
        sources = {m: t for m, t in json.load(open(files[0])).items() if m in models}
        results = json.load(open(files[1]))
        with np.load(files[2]) as z:
            pictures = {k.replace("__", "/"): z[k] for k in z.files if k != "truth"}
    except (OSError, ValueError, KeyError) as e:  # missing, truncated or corrupt
        print(f"{name}: earlier results unreadable ({type(e).__name__}: {e}); evaluating every model again", flush=True)
        return {}, {}, {}
    keep = lambda tag: tag.split("/")[0] in sources
    return ({t: r for t, r in results.items() if keep(t)}, {t: p for t, p in pictures.items() if keep(t)}, sources)


RUNNERS = dict(
    classifier=run_classifier, teacher=run_teacher, data=run_data, student=run_student, dmd=run_dmd, final=run_final
)


def run_job(study: Study, name: str) -> None:
    job = all_jobs()[name]
    missing = [d for d in job.deps if not os.path.exists(study.path(d, "done.json"))]
    if missing:
        raise RuntimeError(f"job {name} needs {missing} finished first")
    os.makedirs(study.path(name), exist_ok=True)
    summary = RUNNERS[job.kind](study, job)
    if not dist.is_main_process():
        return
    with open(study.path(name, "done.json"), "w") as f:
        json.dump(
            {"job": name, "scale": study.scale, "overrides": study.overrides, "seed": study.seed, **summary},
            f,
            indent=1,
        )


# ----------------------------------------------------------------------------- scheduler


def job_command(study: Study, name: str) -> list[str]:
    sets = [a for k, v in sorted(study.overrides.items()) for a in ("--set", f"{k}={v}")]
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--workdir",
        study.workdir,
        "--scale",
        study.scale,
        "--student_weights",
        study.student_weights,
        "--seed",
        str(study.seed),
        *sets,
        "--job",
        name,
    ]


def schedule(
    study: Study, names: list[str], parallel: int, command=job_command, jobs: dict[str, Job] | None = None
) -> dict[str, str]:
    """Run jobs (and their unfinished dependencies) as subprocesses (`command(study, name)`),
    `parallel` at a time, each as soon as its dependencies are done; a job counts as finished
    when it exits 0 (it writes its `done.json`). SIGTERM is passed on to running jobs.
    Returns {job: "done" | "skipped" (done before) | "failed" | "blocked" (a dependency failed) |
    "cancelled" (not started before a SIGTERM)}."""
    jobs = all_jobs() if jobs is None else jobs
    want, stack = set(), list(names)
    done = lambda n: os.path.exists(study.path(n, "done.json"))
    while stack:
        n = stack.pop()
        if n not in jobs:
            raise ValueError(f"unknown job {n!r}; known: {sorted(jobs)}")
        if n not in want:
            want.add(n)
            if not done(n):  # a finished job needs nothing rerun (its inputs may be gone)
                stack.extend(jobs[n].deps)
    status = {n: "skipped" for n in want if done(n)}
    pending = sorted(n for n in want if n not in status)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    os.makedirs(study.path("logs"), exist_ok=True)
    t_start = time.time()

    stopping = []

    def forward(signum, frame):  # a cut run: jobs checkpoint and export (loop.train on SIGTERM)
        stopping.append(signum)
        for p, _ in running.values():
            p.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        _loop(study, jobs, pending, running, status, parallel, command, t_start, stopping)
    finally:
        signal.signal(signal.SIGTERM, old)
    return status


def _loop(study, jobs, pending, running, status, parallel, command, t_start, stopping):
    while pending or running:
        if stopping and pending:
            status.update({n: "cancelled" for n in pending})
            pending.clear()
        for n, (p, t0) in list(running.items()):
            if p.poll() is not None:
                status[n] = "done" if p.returncode == 0 else "failed"
                print(
                    f"[{time.time() - t_start:7.1f}s] {n}: {status[n]} in {time.time() - t0:.0f}s"
                    + ("" if p.returncode == 0 else f" (exit {p.returncode}; log {study.path('logs', n + '.log')})"),
                    flush=True,
                )
                del running[n]
        for n in list(pending):
            deps = jobs[n].deps
            if any(status.get(d) in ("failed", "blocked") for d in deps):
                status[n] = "blocked"
                pending.remove(n)
                print(f"[{time.time() - t_start:7.1f}s] {n}: blocked by a failed dependency", flush=True)
            elif len(running) < parallel and all(status.get(d) in ("done", "skipped") for d in deps):
                with open(study.path("logs", n + ".log"), "w") as log:
                    running[n] = (
                        subprocess.Popen(command(study, n), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT),
                        time.time(),
                    )
                pending.remove(n)
                print(f"[{time.time() - t_start:7.1f}s] {n}: started", flush=True)
        time.sleep(0.2)


def budget_override(text: str) -> tuple[str, int]:
    """`--budget KEY=INTEGER` -> (KEY, INTEGER); argparse's type error otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not value.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected KEY=INTEGER, got {text!r}")
    return key.strip(), int(value)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/toy_study")
    ap.add_argument("--scale", default="full", choices=sorted(SCALES))
    ap.add_argument("--only", default="", help="comma-separated jobs or groups (prep); default: all")
    ap.add_argument("--parallel", type=int, default=8, help="jobs run at once (processes)")
    ap.add_argument(
        "--student_weights",
        default="ema",
        choices=STUDENT_WEIGHTS,
        help="evaluate and export students / SF-DMD as their power EMA (default) or their raw "
        "weights (what session 4's run did)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        type=budget_override,
        metavar="KEY=VALUE",
        help="replace one budget of the scale (repeatable), e.g. --set dmd_iters=1000; "
        "recorded in each job's done.json",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="added to every training job's seeds (one workdir per seed; evaluation fixed)",
    )
    ap.add_argument("--job", default="", help="(internal) run one job in this process")
    ap.add_argument("--report", default="", help="write tables/plots of the workdir to this directory")
    ap.add_argument(
        "--repeats",
        default="",
        help="with --report: comma-separated workdirs of the same study "
        "at other --seed values, pooled in 'Claim 2 over seeds'",
    )
    args = ap.parse_args(argv)
    if args.repeats and not args.report:
        ap.error("--repeats pools other seeds' workdirs into a report: it needs --report DIR")
    study = Study(os.path.abspath(args.workdir), args.scale, args.student_weights, dict(args.set), args.seed)
    if args.job:
        run_job(study, args.job)
        return 0
    if args.report:
        from experiments import toy_study_report

        toy_study_report.write_report(study, args.report, tuple(w for w in args.repeats.split(",") if w))
        return 0
    names = [x for part in args.only.split(",") if part for x in GROUPS.get(part, (part,))] or sorted(
        n for n in all_jobs() if n not in DIAGNOSTICS
    )
    status = schedule(study, names, args.parallel)
    bad = {n: s for n, s in status.items() if s in ("failed", "blocked", "cancelled")}
    print("jobs:", json.dumps(status, sort_keys=True))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
