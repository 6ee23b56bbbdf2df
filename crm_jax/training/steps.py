"""Train state and one jitted step function per training mode.

Modes (`TrainConfig.mode`): the table in `crm_jax.training.modes`.

A step takes `(state, frozen, batch, key)` and returns `(state, metrics)`. A step whose loss
or gradients are not finite leaves the state unchanged (`nan_skips` and `nan_streak`
count it). The student step of the DMD modes takes the self-forcing step count as a
static argument. Batches are dicts: `latents [B, T, H, W, C]`, `context [B, L, D]`,
optional `actions [B, T]`, and for `ode_init` `ode_traj [B, K, T, H, W, C]`,
`ode_times [K]`.

A student step can also run as separate jits (`crm_jax.training.offload`, for host-offloaded
EMA / teachers): `teacher_pass` computes everything that needs the frozen teachers,
`student_step(..., teacher_out=...)` the rest without them, and `ema_step` the power-EMA
update after a step run on a state without its EMA (`state.ema = None`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from crm_jax import diffusion as D
from crm_jax import losses as L
from crm_jax.models import adapter
from crm_jax.models.wan import AttentionPattern
from crm_jax.training import ema as ema_lib
from crm_jax.training import self_forcing
from crm_jax.training.modes import Mode, get_mode
from crm_jax.training.optim import make_optimizer

# How DMD's real score (teacher) and fake score (critic) see a rollout G noised to x_t: "full"
# (bidirectional teacher), "block_causal" (every chunk sees the noised earlier chunks), or
# "teacher_forcing" (`[sg(G) | x_t]`: every chunk sees the generator's own *clean* earlier chunks, the
# layout a teacher-forcing teacher was trained on; by the chain rule of KL the per-chunk conditional
# scores given G's own past match the joint).
DMD_SCORE_PATTERNS = ("full", "block_causal", "teacher_forcing")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static hyper-parameters of the steps (hashable)."""

    mode: str
    block_frames: int = 1
    first_block_frames: int | None = None
    lr: float = 2e-6
    critic_lr: float = 4e-7
    warmup_steps: int = 0
    grad_clip: float = 0.0
    weight_decay: float = 0.01
    adam_b1: float = 0.0  # the distillation default (docs/design.md); teachers from scratch use 0.9
    ema_sigma_rel: float = 0.1
    guidance: float = 5.0
    tangent_warmup: int = 0
    tangent_normalise: bool = True  # sCM's g_hat = g / (||g|| + 0.1); False = g (an ablation)
    p_mean: float = -0.8
    p_std: float = 1.6
    dcm_steps: int = 48
    dcm_shift: float = 5.0
    dmd_weight: float = 1.0
    dmd_teacher_pattern: str = "full"
    sf_sigma_max: float = 80.0
    sf_context: str = "clean"
    sf_replay: bool = True
    meanflow_r_eq_t: float = 0.75
    cond_dropout: float = 0.0
    fm_weighting: str = "bell"  # teacher pretraining: "bell" (docs/design.md, fine-tuning Wan) or "none"
    fm_shift: float = 5.0  # teacher pretraining times ~ UniformShift(fm_shift)
    student_update_freq: int = 5
    sf_max_steps: int = 4

    def __post_init__(self):
        get_mode(self.mode)
        if self.dmd_teacher_pattern not in DMD_SCORE_PATTERNS:
            raise ValueError(
                f"dmd_teacher_pattern must be one of {DMD_SCORE_PATTERNS}, got {self.dmd_teacher_pattern!r}"
            )

    def pattern(self, kind: str) -> AttentionPattern:
        if kind == "full":
            return AttentionPattern("full")
        return AttentionPattern(kind, self.block_frames, self.first_block_frames)

    @property
    def spec(self) -> Mode:
        """The mode's entry in the registry (`crm_jax.training.modes`)."""
        return get_mode(self.mode)

    @property
    def has_critic(self) -> bool:
        return self.spec.has_critic

    @property
    def needs_teacher(self) -> bool:
        return self.spec.needs_teacher


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs (frozen teachers live outside, in `Frozen`).

    `ema` is None only inside a step whose EMA is kept outside it (`crm_jax.training.offload`):
    such a student step leaves the EMA to `Trainer.ema_step`.
    """

    step: jax.Array  # student optimizer updates applied
    iteration: jax.Array  # loop iterations (student + critic steps)
    params: Any
    ema: Any
    opt_state: Any
    critic: Any
    critic_opt_state: Any
    nan_skips: jax.Array
    nan_streak: jax.Array


@flax.struct.dataclass
class Frozen:
    """Frozen networks' parameters and the negative-prompt embedding `[L, D]` for CFG."""

    teacher: Any
    dmd_teacher: Any
    neg_context: jax.Array


def on_device(tree):
    """Bring host-offloaded leaves (memory kind "pinned_host") into device memory inside a
    jitted step; leaves already in device memory are returned untouched. Where they end up
    after the step is set by its output shardings (`sharding.state_shardings(..., offload=...)`)."""

    def one(x):
        if getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host:
            return jax.device_put(x, jax.memory.Space.Device)
        return x  # no device_put otherwise: it would commit the step's outputs to one device

    return jax.tree.map(one, tree)


@flax.struct.dataclass
class TeacherOutputs:
    """What a student step needs from the frozen teachers, computed by `Trainer.teacher_pass`.

    cm: the CM loss's teacher outputs in call order (velocities shaped like their inputs, e.g.
      `[B, 2T, H, W, C]` for teacher forcing; two per loss with CFG: conditional, unconditional);
      () for modes whose student step has no CM loss (sf_dmd).
    dmd: for the DMD part, `(loss, metrics, last, cotangent)` of the self-forcing rollout scored by
      the teacher and the critic: `last[i] = (x_in [B, f, H, W, C], KVCache)` of block i (the
      replayed backward's inputs, `self_forcing.rollout`) except that block 0's cache, the empty
      cache, is None (rebuilt by the step instead of carried: a full-size buffer of zeros),
      `cotangent [B, T, H, W, C]` = dLoss/dG; None without the DMD part.
    """

    cm: tuple
    dmd: Any


def _recording(fn, tape: list):
    """`fn` that also appends each output to `tape` (inside `Trainer.teacher_pass`)."""

    def rec(x, t, cond):
        out = fn(x, t, cond)
        tape.append(out)
        return out

    return rec


class _Replay:
    """A network callable returning recorded outputs in call order (the same code path that
    recorded them calls it, so the order matches); `done()` checks that all were used."""

    def __init__(self, outputs):
        self.outputs, self.used = tuple(outputs), 0

    def __call__(self, x, t, cond):
        if self.used == len(self.outputs):
            raise ValueError(f"the loss called the teacher more than the {len(self.outputs)} recorded times")
        out = self.outputs[self.used]
        if out.shape != x.shape:
            raise ValueError(
                f"recorded teacher output {self.used} has shape {out.shape}, the call's input "
                f"{x.shape}: teacher_out does not belong to this step"
            )
        self.used += 1
        return out

    def done(self):
        if self.used != len(self.outputs):
            raise ValueError(f"{len(self.outputs)} teacher outputs recorded, {self.used} used")


def _teachers_on_device(frozen: Frozen | None) -> Frozen | None:
    if frozen is None:
        return None
    return frozen.replace(teacher=on_device(frozen.teacher), dmd_teacher=on_device(frozen.dmd_teacher))


def _finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _cond(batch):
    c = {"context": batch["context"]}
    if batch.get("actions") is not None:
        c["actions"] = batch["actions"]
    return c


class Trainer:
    """Builds the optimizers and the pure step functions of one training mode.

    Args:
      cfg: `TrainConfig`.
      apply: the functional model (`crm_jax.models.wan.functional`), shared by the
        student, teachers and critic (same architecture).
      model_cfg: the student's `WanConfig` (KV-cache shapes of the rollout).
      teacher_apply: the frozen networks' functional model when their architecture
        differs from the student's (a MeanFlow student has an extra interval embedding).
    """

    def __init__(self, cfg: TrainConfig, apply, model_cfg, teacher_apply=None):
        self.cfg = cfg
        self.apply = apply
        self.teacher_apply = apply if teacher_apply is None else teacher_apply
        self.model_cfg = model_cfg
        opt = dict(
            warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, weight_decay=cfg.weight_decay, b1=cfg.adam_b1
        )
        self.tx = make_optimizer(cfg.lr, **opt)
        self.critic_tx = make_optimizer(cfg.critic_lr, **opt)
        self.gamma = ema_lib.sigma_rel_to_gamma(cfg.ema_sigma_rel)

    # ----------------------------------------------------------------- state
    def init_state(self, params, critic=None) -> TrainState:
        if self.cfg.has_critic and critic is None:
            raise ValueError(f"mode {self.cfg.mode!r} needs critic parameters (usually the DMD teacher's)")
        # Copies: the state is donated to the step, so it must not alias the frozen teacher's
        # buffers (the critic starts as the teacher) nor share buffers between params and EMA.
        copy = lambda t, dtype=None: jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), t)
        critic = copy(critic) if self.cfg.has_critic else None
        zero = lambda: jnp.zeros((), jnp.int32)
        return TrainState(
            step=zero(),
            iteration=zero(),
            params=params,
            ema=copy(params, jnp.float32),
            opt_state=self.tx.init(params),
            critic=critic,
            critic_opt_state=None if critic is None else self.critic_tx.init(critic),
            nan_skips=zero(),
            nan_streak=zero(),
        )

    # ----------------------------------------------------------------- losses
    def rollout_spec(self, num_frames: int, sf_steps: int) -> self_forcing.RolloutSpec:
        times = D.few_step_times(sf_steps, self.cfg.sf_sigma_max)
        return self_forcing.RolloutSpec(
            self.cfg.pattern("block_causal"), num_frames, tuple(float(t) for t in times), self.cfg.sf_context
        )

    def score_fn(self, params):
        """DMD's real (teacher) or fake (critic) score network `fn(x_t, t, cond) -> v` on
        `dmd_teacher_pattern`; with "teacher_forcing" it needs `score_cond`'s `tf_context`."""
        c = self.cfg
        make = adapter.tf_velocity_fn if c.dmd_teacher_pattern == "teacher_forcing" else adapter.velocity_fn
        return make(self.teacher_apply, params, c.pattern(c.dmd_teacher_pattern))

    def score_cond(self, cond, G):
        """`cond` of the score networks for rollout `G`: with "teacher_forcing" it gains
        `tf_context = sg(G)` (no gradient reaches G through the context)."""
        if self.cfg.dmd_teacher_pattern != "teacher_forcing":
            return cond
        return {**cond, "tf_context": jax.lax.stop_gradient(G)}

    def cm_teacher(self, frozen: Frozen):
        """The frozen network callable of the CM loss (None for modes without a teacher)."""
        c = self.cfg
        kind = c.spec.cm_teacher
        if kind is None:
            return None
        make = adapter.tf_velocity_fn if kind == "tf_velocity" else adapter.velocity_fn
        return make(self.teacher_apply, frozen.teacher, c.pattern("teacher_forcing"))

    def cm_loss(self, params, frozen: Frozen, batch, key, step, teacher=None):
        """The forward-divergence part: teacher pretraining, TF-sCM/MeanFlow/dCM or ODE init.

        `teacher`: the network callable standing in for `cm_teacher(frozen)` (recording or
        replaying its outputs, see `teacher_pass`); default `cm_teacher(frozen)`."""
        c = self.cfg
        x0, cond = batch["latents"], _cond(batch)
        uncond = adapter.uncond_like(cond, frozen.neg_context) if frozen is not None else None
        if c.cond_dropout > 0:  # teacher pretraining: learn the unconditional branch used by CFG
            key, k_drop = jax.random.split(key)
            drop = jax.random.bernoulli(k_drop, c.cond_dropout, (x0.shape[0],))[:, None, None]
            cond = dict(
                cond, context=jnp.where(drop, frozen.neg_context.astype(cond["context"].dtype), cond["context"])
            )
        if c.spec.loss is None:
            raise ValueError(f"mode {c.mode!r} has no CM loss")
        teacher = self.cm_teacher(frozen) if teacher is None else teacher
        return getattr(self, f"_{c.spec.loss}_loss")(params, batch, cond, uncond, teacher, key, step)

    # One method per `modes.CM_LOSSES` entry: (params, batch, cond, uncond, teacher, key, step)
    # -> (loss, metrics). `cond` has the dropout applied; `uncond` is None without a teacher.
    def _fm(self):
        c = self.cfg
        return dict(sampler=D.uniform_shift_sampler(c.fm_shift), weighting=c.fm_weighting)

    def _flow_matching_loss(self, params, batch, cond, uncond, teacher, key, step):
        fn = adapter.velocity_fn(self.apply, params, self.cfg.pattern("full"))
        return L.flow_matching_loss(fn, batch["latents"], cond, key, **self._fm())

    def _teacher_forcing_loss(self, params, batch, cond, uncond, teacher, key, step):
        fn = adapter.velocity_fn(self.apply, params, self.cfg.pattern("teacher_forcing"))
        return L.teacher_forcing_loss(fn, batch["latents"], cond, key, **self._fm())

    def _diffusion_forcing_loss(self, params, batch, cond, uncond, teacher, key, step):
        c, x0 = self.cfg, batch["latents"]
        sizes = D.block_sizes(x0.shape[1], c.block_frames, c.first_block_frames)
        fn = adapter.velocity_fn(self.apply, params, c.pattern("block_causal"))
        return L.diffusion_forcing_loss(fn, x0, cond, key, sizes, **self._fm())

    def _scm_loss(self, params, batch, cond, uncond, teacher, key, step):
        c, a, tf = self.cfg, self.apply, self.cfg.pattern("teacher_forcing")
        return L.scm_rf_loss(
            adapter.velocity_fn(a, params, tf),
            adapter.velocity_fn(a, params, tf, ad="jvp", stop_grad=True),
            teacher,
            batch["latents"],
            cond,
            key,
            uncond=uncond,
            guidance=c.guidance,
            step=step,
            tangent_warmup=c.tangent_warmup,
            teacher_forcing=True,
            p_mean=c.p_mean,
            p_std=c.p_std,
            normalise=c.tangent_normalise,
        )

    def _meanflow_loss(self, params, batch, cond, uncond, teacher, key, step):
        c, a, tf, x0 = self.cfg, self.apply, self.cfg.pattern("teacher_forcing"), batch["latents"]
        return L.meanflow_loss(
            adapter.average_velocity_fn(a, params, tf),
            adapter.average_velocity_fn(a, params, tf, ad="jvp", stop_grad=True),
            x0,
            dict(cond, tf_context=x0),
            key,
            teacher_fn=teacher,
            uncond=dict(uncond, tf_context=x0),
            guidance=c.guidance,
            r_equals_t_fraction=c.meanflow_r_eq_t,
        )

    def _dcm_loss(self, params, batch, cond, uncond, teacher, key, step):
        c = self.cfg
        return L.dcm_loss(
            adapter.velocity_fn(self.apply, params, c.pattern("teacher_forcing")),
            teacher,
            batch["latents"],
            cond,
            key,
            uncond=uncond,
            guidance=c.guidance,
            num_steps=c.dcm_steps,
            shift=c.dcm_shift,
            teacher_forcing=True,
        )

    def _ode_regression_loss(self, params, batch, cond, uncond, teacher, key, step):
        c, x0 = self.cfg, batch["latents"]
        sizes = D.block_sizes(x0.shape[1], c.block_frames, c.first_block_frames)
        return L.ode_regression_loss(
            adapter.velocity_fn(self.apply, params, c.pattern("block_causal")),
            batch["ode_traj"],
            batch["ode_times"],
            x0,
            cond,
            key,
            sizes=sizes,
        )

    def _dmd_loss(self, G, frozen, critic, cond, key):
        """DMD loss of rollout `G`: real score = the frozen DMD teacher with CFG, fake = `critic`,
        both on `dmd_teacher_pattern` (with `sg(G)` as their context where it needs one)."""
        sc = self.score_cond(cond, G)
        return L.dmd_loss(
            G,
            self.score_fn(frozen.dmd_teacher),
            self.score_fn(critic),
            sc,
            key,
            uncond=adapter.uncond_like(sc, frozen.neg_context),
            guidance=self.cfg.guidance,
        )

    def _dmd_cotangent(self, G, frozen, critic, cond, key):
        """(loss, metrics, dloss/dG) of `_dmd_loss`: the cotangent the replayed backward starts from."""
        (l, m), g = jax.value_and_grad(self._dmd_loss, has_aux=True)(G, frozen, critic, cond, key)
        return l, m, g

    # ----------------------------------------------------------------- steps
    def _apply_update(self, state: TrainState, grads, loss, metrics):
        # A host-offloaded EMA comes to the device only here, for its update; a state without
        # its EMA (None: kept outside the step) is updated by `ema_step` after the step.
        state = state.replace(ema=on_device(state.ema))
        ok = jnp.isfinite(loss) & _finite(grads)
        grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        new = state.replace(params=params, opt_state=opt_state, step=step)
        if state.ema is not None:
            new = new.replace(ema=ema_lib.ema_update(state.ema, params, step, self.gamma))
        new = _select(ok, new, state)
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), skipped=(~ok).astype(jnp.int32))
        return new.replace(
            iteration=state.iteration + 1,
            nan_skips=state.nan_skips + (~ok),
            nan_streak=jnp.where(ok, 0, state.nan_streak + 1),
        ), metrics

    def ema_step(self, ema, params, step, skipped):
        """The power-EMA update of a student step that ran on a state without its EMA.

        Its own jit after the step (`crm_jax.training.offload`), so the step never holds the EMA.
        ema: the EMA before the step (float32 tree shaped like the params; may live in pinned host
        memory); params, step: the step's new `state.params` and `state.step`; skipped: its
        `metrics["skipped"]` (int32 scalar; 1 = non-finite step, the EMA is kept). The same update
        as inside `student_step`: beta = ema_decay(step), ema <- beta ema + (1 - beta) params.
        """
        ema = on_device(ema)
        return _select(skipped == 0, ema_lib.ema_update(ema, params, step, self.gamma), ema)

    def teacher_pass(
        self, state: TrainState, frozen: Frozen, batch, key, sf_steps: int = 1, use_dmd: bool = True
    ) -> TeacherOutputs:
        """The part of `student_step` (same arguments) that needs the frozen teachers.

        The CM loss is traced with a recording teacher and only the teacher's outputs are
        returned, so the student's passes are dead code (dropped by `jax.jit`); with the DMD
        part, the stop-gradient self-forcing rollout is scored by the teacher and the critic
        (that part needs `sf_replay`). `student_step(..., teacher_out=...)` then runs without
        the teachers, so a split step holds no teacher on the device during the student's backward.
        """
        c = self.cfg
        if not c.needs_teacher:
            raise ValueError(f"mode {c.mode!r} has no teacher")
        frozen = _teachers_on_device(frozen)
        k_cm, k_sf, k_dmd = jax.random.split(key, 3)
        tape = []
        if c.spec.loss is not None:
            self.cm_loss(
                state.params, frozen, batch, k_cm, state.step, teacher=_recording(self.cm_teacher(frozen), tape)
            )
        dmd = None
        if c.has_critic and use_dmd:
            if not c.sf_replay:
                raise ValueError(
                    "a split step's DMD part needs train.sf_replay=True (the direct backward "
                    "differentiates through the rollout that the teacher scores)"
                )
            loss, m, last, cot = self._dmd_scores(state, frozen, batch, k_sf, k_dmd, sf_steps)
            dmd = (loss, m, [(last[0][0], None)] + last[1:], cot)
        return TeacherOutputs(tuple(tape), dmd)

    def student_step(
        self,
        state: TrainState,
        frozen: Frozen,
        batch,
        key,
        sf_steps: int = 1,
        use_dmd: bool = True,
        teacher_out: TeacherOutputs | None = None,
    ):
        """One student update. `sf_steps` (static) = self-forcing denoising steps per block;
        `use_dmd=False` runs the CM loss alone (rCM's tangent warm-up phase). `teacher_out`: the
        teachers' part, precomputed by `teacher_pass` with the same arguments; the step then
        does not use `frozen.teacher` / `frozen.dmd_teacher` (they may be None)."""
        c = self.cfg
        frozen = _teachers_on_device(frozen)
        k_cm, k_sf, k_dmd = jax.random.split(key, 3)
        metrics = {}
        if c.spec.loss is not None:
            replay = None if teacher_out is None else _Replay(teacher_out.cm)
            (loss, m), grads = jax.value_and_grad(self.cm_loss, has_aux=True)(
                state.params, frozen, batch, k_cm, state.step, replay
            )
            if replay is not None:
                replay.done()
            metrics.update({f"cm/{k}": v for k, v in m.items()})
        else:
            loss, grads = jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params)
        if c.has_critic and use_dmd:
            if teacher_out is not None and teacher_out.dmd is None:
                raise ValueError("teacher_out has no DMD part: it was computed with use_dmd=False")
            scores = None if teacher_out is None else teacher_out.dmd
            dmd_l, m, dmd_g = self.dmd_grads(state, frozen, batch, k_sf, k_dmd, sf_steps, scores)
            metrics.update({f"dmd/{k}": v for k, v in m.items()})
            loss = loss + c.dmd_weight * dmd_l
            grads = jax.tree.map(lambda a, b: a + c.dmd_weight * b, grads, dmd_g)
        return self._apply_update(state, grads, loss, metrics)

    def _rollout(self, params, batch, key, sf_steps):
        x0 = batch["latents"]
        k_noise, k_roll = jax.random.split(key)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        spec = self.rollout_spec(x0.shape[1], sf_steps)
        cache = self.empty_cache(x0, spec)
        return self_forcing.rollout(self.apply, params, noise, _cond(batch), k_roll, spec, cache), spec

    def empty_cache(self, x0, spec):
        b, _, h, w, _ = x0.shape
        model_cfg = self.model_cfg
        _, ph, pw = model_cfg.patch_size
        return self_forcing.empty_cache(model_cfg, b, spec, (h // ph) * (w // pw))

    def _dmd_scores(self, state, frozen, batch, k_sf, k_dmd, sf_steps):
        """Stop-gradient rollout scored by the teacher and the critic: (loss, metrics, last, cotangent)."""
        (G, last), _ = self._rollout(jax.lax.stop_gradient(state.params), batch, k_sf, sf_steps)
        loss, m, cot = self._dmd_cotangent(G, frozen, state.critic, _cond(batch), k_dmd)
        return loss, m, last, cot

    def dmd_grads(self, state, frozen, batch, k_sf, k_dmd, sf_steps, scores=None):
        """(DMD loss `[]`, metrics, student gradient shaped like `state.params`) of the self-forcing
        rollout of `batch` (`latents [B, T, H, W, C]`, `context [B, L, D]`); `scores`:
        `TeacherOutputs.dmd`, precomputed (then the frozen teachers are not called)."""
        cond = _cond(batch)
        if self.cfg.sf_replay:
            spec = self.rollout_spec(batch["latents"].shape[1], sf_steps)
            if scores is None:
                loss, m, last, cot = self._dmd_scores(state, frozen, batch, k_sf, k_dmd, sf_steps)
            else:  # block 0's cache, the empty one, is rebuilt rather than carried
                loss, m, last, cot = scores
                last = [(last[0][0], self.empty_cache(batch["latents"], spec))] + list(last[1:])
            grads = self_forcing.replayed_grad(self.apply, state.params, last, cot, cond, spec)
            return loss, m, grads
        if scores is not None:
            raise ValueError("precomputed DMD scores need train.sf_replay=True")

        def direct(params):
            (G, _), _ = self._rollout(params, batch, k_sf, sf_steps)
            return self._dmd_loss(G, frozen, state.critic, cond, k_dmd)

        (loss, m), grads = jax.value_and_grad(direct, has_aux=True)(state.params)
        return loss, m, grads

    def critic_step(self, state: TrainState, frozen: Frozen, batch, key, sf_steps: int = 1):
        """One critic (fake score) update on a detached self-forcing rollout."""
        c = self.cfg
        if not c.has_critic:
            raise ValueError(f"mode {c.mode!r} has no critic")
        frozen = _teachers_on_device(frozen)
        k_sf, k_l = jax.random.split(key)
        (G, _), _ = self._rollout(jax.lax.stop_gradient(state.params), batch, k_sf, sf_steps)
        G = jax.lax.stop_gradient(G)
        cond = self.score_cond(_cond(batch), G)

        def loss_fn(critic):
            return L.critic_loss(self.score_fn(critic), G, cond, k_l)

        (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.critic)
        ok = jnp.isfinite(loss) & _finite(grads)
        grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
        updates, copt = self.critic_tx.update(grads, state.critic_opt_state, state.critic)
        critic, copt = _select(
            ok, (optax.apply_updates(state.critic, updates), copt), (state.critic, state.critic_opt_state)
        )
        new = state.replace(critic=critic, critic_opt_state=copt)  # the EMA is not touched
        metrics = {f"critic/{k}": v for k, v in m.items()}
        metrics.update(loss=loss, skipped=(~ok).astype(jnp.int32))
        return new.replace(
            iteration=state.iteration + 1,
            nan_skips=state.nan_skips + (~ok),
            nan_streak=jnp.where(ok, 0, state.nan_streak + 1),
        ), metrics

    # ----------------------------------------------------------------- schedule
    def plan(self, iteration: int, freq: int) -> tuple[str, int, bool]:
        """(which step, self-forcing steps, use_dmd) for a loop iteration.

        rCM / SF-DMD: CM-only student steps during the tangent warm-up, then one
        student step every `freq` iterations with critic steps in between; the
        self-forcing step count cycles n = (iteration mod sf_max_steps) + 1.
        """
        c = self.cfg
        if not c.has_critic:
            return "student", 1, False
        sf_steps = iteration % c.sf_max_steps + 1
        if c.spec.tangent_warmup and iteration < c.tangent_warmup:
            return "student", sf_steps, False
        return ("student" if iteration % freq == 0 else "critic"), sf_steps, True
