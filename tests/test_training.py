"""Train steps: sharded == unsharded for every mode, NaN skipping, SF rollout gradients,
host offload (split steps)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax.models.config import TINY
from crm_jax.models.wan import AttentionPattern, functional, init_model
from crm_jax.training import self_forcing
from crm_jax.training import sharding as shd
from crm_jax.training.modes import MODES
from crm_jax.training.offload import make_step
from crm_jax.training.steps import Frozen, TrainConfig, Trainer

B, T, H, W = 8, 2, 4, 4


def model_cfg(mode):
    return TINY.replace(num_layers=1, num_actions=5, mean_flow=(mode == "tf_meanflow"))


@functools.cache
def setup(mode):
    mcfg = model_cfg(mode)
    apply, params = functional(init_model(mcfg, 0))
    teacher_apply, teacher = functional(init_model(mcfg.replace(mean_flow=False), 1))
    tcfg = TrainConfig(mode=mode, block_frames=1, lr=1e-3, critic_lr=1e-3, guidance=2.0, tangent_warmup=4)
    trainer = Trainer(tcfg, apply, mcfg, teacher_apply=teacher_apply)
    state = trainer.init_state(params, critic=teacher if tcfg.has_critic else None)
    frozen = Frozen(teacher, teacher, jnp.zeros((mcfg.text_len, mcfg.text_dim)))
    ks = jax.random.split(jax.random.key(42), 4)
    batch = dict(
        latents=jax.random.normal(ks[0], (B, T, H, W, mcfg.in_channels)),
        context=jax.random.normal(ks[1], (B, mcfg.text_len, mcfg.text_dim)),
        actions=jax.random.randint(ks[2], (B, T), 0, 5),
    )
    if mode == "ode_init":
        batch["ode_traj"] = jax.random.normal(ks[3], (B, 3, T, H, W, mcfg.in_channels))
        batch["ode_times"] = jnp.array([0.95, 0.7, 0.4])
    return trainer, state, frozen, batch


def run_step(trainer, state, frozen, batch, mesh=None, which="student"):
    fn = trainer.student_step if which == "student" else trainer.critic_step
    kw = dict(sf_steps=2) if which == "critic" else dict(sf_steps=2, use_dmd=True)
    key = jax.random.key(7)
    if mesh is None:
        return jax.jit(functools.partial(fn, **kw))(state, frozen, batch, key)
    st_sh, fr_sh = shd.state_shardings(state, mesh), shd.state_shardings(frozen, mesh)
    b_sh = shd.batch_shardings(batch, mesh, B)
    step = shd.jit_step(
        functools.partial(fn, **kw), mesh, (st_sh, fr_sh, b_sh, shd.replicated(key, mesh)), (st_sh, None)
    )
    return step(jax.device_put(state, st_sh), jax.device_put(frozen, fr_sh), jax.device_put(batch, b_sh), key)


def rel_tree(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y**2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


CASES = [(m, "student") for m in MODES] + [("sf_dmd", "critic")]


@pytest.mark.parametrize("mode,which", CASES, ids=[f"{m}-{w}" for m, w in CASES])
def test_sharded_step_equals_single_device(mode, which):
    assert len(jax.devices()) >= 8, "tests run with 8 host devices (see tests/conftest.py)"
    trainer, state, frozen, batch = setup(mode)
    ref_state, ref_m = run_step(trainer, state, frozen, batch, which=which)
    assert int(ref_state.nan_skips) == 0 and np.isfinite(float(ref_m["loss"]))
    moved = ref_state.params if which == "student" else ref_state.critic
    before = state.params if which == "student" else state.critic
    assert rel_tree(moved, before) > 1e-6, "the step must change the parameters"
    for data, fsdp in [(4, 2), (1, 8)]:
        new_state, m = run_step(trainer, state, frozen, batch, shd.make_mesh(data, fsdp), which=which)
        assert abs(float(m["loss"]) - float(ref_m["loss"])) <= 1e-5 * max(1.0, abs(float(ref_m["loss"])))
        got = new_state.params if which == "student" else new_state.critic
        assert rel_tree(got, moved) <= 1e-5, (data, fsdp)


CP_CASES = [("tf_scm", "student"), ("sf_dmd", "student"), ("sf_dmd", "critic")]


@pytest.mark.parametrize("mode,which", CP_CASES, ids=[f"{m}-{w}" for m, w in CP_CASES])
def test_context_parallel_step_equals_single_device(mode, which):
    """(data, fsdp, context) meshes: frame tokens split over "context" (Ulysses attention)."""
    trainer, state, frozen, batch = setup(mode)
    ref_state, ref_m = run_step(trainer, state, frozen, batch, which=which)
    ref = ref_state.params if which == "student" else ref_state.critic
    for data, fsdp, context in [(2, 1, 4), (2, 2, 2)]:
        mesh = shd.make_mesh(data, fsdp, context)
        new_state, m = run_step(trainer, state, frozen, batch, mesh, which=which)
        assert abs(float(m["loss"]) - float(ref_m["loss"])) <= 1e-5 * max(1.0, abs(float(ref_m["loss"])))
        got = new_state.params if which == "student" else new_state.critic
        assert rel_tree(got, ref) <= 1e-5, (data, fsdp, context)


def test_nan_batch_is_skipped_and_counted():
    trainer, state, frozen, batch = setup("teacher_tf")
    bad = dict(batch, latents=batch["latents"].at[0, 0, 0, 0, 0].set(jnp.nan))
    new_state, m = run_step(trainer, state, frozen, bad)
    assert int(new_state.nan_skips) == 1 and int(new_state.nan_streak) == 1 and int(m["skipped"]) == 1
    assert int(new_state.step) == 0
    chex.assert_trees_all_equal(new_state.params, state.params)
    ok_state, _ = run_step(trainer, new_state, frozen, batch)
    assert int(ok_state.nan_streak) == 0 and int(ok_state.step) == 1


def _rollout_setup(context_mode, steps):
    mcfg = TINY.replace(num_layers=1, num_actions=5)
    apply, params = functional(init_model(mcfg, 3))
    pat = AttentionPattern("block_causal", 1)
    times = (0.98, 0.8, 0.5, 0.0)[-(steps + 1) :] if steps < 3 else (0.98, 0.8, 0.5, 0.0)
    spec = self_forcing.RolloutSpec(pat, 3, times, context_mode)
    ks = jax.random.split(jax.random.key(5), 4)
    noise = jax.random.normal(ks[0], (2, 3, H, W, mcfg.in_channels))
    cond = {
        "context": jax.random.normal(ks[1], (2, mcfg.text_len, mcfg.text_dim)),
        "actions": jax.random.randint(ks[2], (2, 3), 0, 5),
    }
    cache = self_forcing.empty_cache(mcfg, 2, spec, (H // 2) * (W // 2))
    return apply, params, noise, cond, ks[3], spec, cache


@pytest.mark.parametrize("context_mode", ["clean", "noisy"])
def test_replayed_backward_equals_direct_backward(context_mode):
    apply, params, noise, cond, key, spec, cache = _rollout_setup(context_mode, 3)
    weights = jax.random.normal(jax.random.key(9), noise.shape)

    def direct(p):
        G, _ = self_forcing.rollout(apply, p, noise, cond, key, spec, cache)
        return jnp.sum(G * weights)

    g_direct = jax.grad(direct)(params)
    G, last = self_forcing.rollout(apply, jax.lax.stop_gradient(params), noise, cond, key, spec, cache)
    g_replay = self_forcing.replayed_grad(apply, params, last, weights, cond, spec)
    assert rel_tree(g_replay, g_direct) < 1e-5
    assert sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(g_direct)) > 0


def test_gradient_flows_only_through_each_blocks_last_step():
    apply, params, noise, cond, key, spec, cache = _rollout_setup("clean", 3)
    # G as a function of the noise: only the first step consumes it, and that step
    # runs without gradient, so dG/dnoise must vanish; the last step's input is live.
    g_noise = jax.grad(lambda n: jnp.sum(self_forcing.rollout(apply, params, n, cond, key, spec, cache)[0]))(noise)
    assert float(jnp.abs(g_noise).max()) == 0.0
    G, last = self_forcing.rollout(apply, params, noise, cond, key, spec, cache)
    x_last, cache_before = last[1]

    def block1(x):
        v, _ = apply(
            params,
            x,
            jnp.full(x.shape[:2], spec.times[-2]),
            cond["context"],
            pattern=spec.pattern,
            actions=cond["actions"][:, 1:2],
            cache=cache_before,
            cache_frames=1,
        )
        return jnp.sum(x - spec.times[-2] * v)

    assert float(jnp.abs(jax.grad(block1)(x_last)).max()) > 0


def test_plan_schedule():
    trainer, *_ = setup("rcm")
    plan = [trainer.plan(i, 5) for i in range(12)]
    assert [p[0] for p in plan[:4]] == ["student"] * 4 and not any(p[2] for p in plan[:4])  # warm-up
    assert [p[0] for p in plan[4:11]] == ["student" if i % 5 == 0 else "critic" for i in range(4, 11)]
    assert all(p[2] for p in plan[4:])
    assert [p[1] for p in plan[:5]] == [1, 2, 3, 4, 1]


def test_bad_configs():
    with pytest.raises(ValueError, match="unknown training mode 'nope'"):
        TrainConfig(mode="nope")
    with pytest.raises(ValueError, match="not divisible by the mesh"):
        shd.check_batch(6, shd.make_mesh(4, 1))
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh(4, 4)
    trainer, *_ = setup("sf_dmd")
    with pytest.raises(ValueError, match="needs critic parameters"):
        trainer.init_state(setup("sf_dmd")[1].params)


@pytest.mark.parametrize("mode", ["tf_scm", "sf_dmd"])
def test_teacher_larger_than_student(mode):
    """A teacher/critic of another architecture (here wider and deeper) drives the student."""
    mcfg = model_cfg(mode)
    tcfg_model = mcfg.replace(dim=128, ffn_dim=256, num_layers=2)
    apply, params = functional(init_model(mcfg, 0))
    teacher_apply, teacher = functional(init_model(tcfg_model, 1))
    _, other_teacher = functional(init_model(tcfg_model, 2))
    tcfg = TrainConfig(mode=mode, block_frames=1, lr=1e-3, critic_lr=1e-3, guidance=2.0)
    trainer = Trainer(tcfg, apply, mcfg, teacher_apply=teacher_apply)
    _, _, _, batch = setup(mode)
    neg = jnp.zeros((mcfg.text_len, mcfg.text_dim))
    losses = []
    for tp in (teacher, other_teacher):
        state = trainer.init_state(jax.tree.map(jnp.copy, params), critic=tp if tcfg.has_critic else None)
        new, m = run_step(trainer, state, Frozen(tp, tp, neg), batch)
        assert np.isfinite(float(m["loss"])) and int(new.nan_skips) == 0
        assert rel_tree(new.params, params) > 1e-6
        losses.append(float(m["loss"]))
        if tcfg.has_critic:
            assert jax.tree.map(jnp.shape, new.critic) == jax.tree.map(jnp.shape, teacher)
            crit, mc = run_step(trainer, state, Frozen(tp, tp, neg), batch, which="critic")
            assert np.isfinite(float(mc["loss"])) and rel_tree(crit.critic, tp) > 1e-6
    assert losses[0] != losses[1], "the loss must depend on the (larger) teacher"


def test_teacher_model_config():
    import ml_collections

    from crm_jax.training.run_setup import teacher_model_config

    student = TINY.replace(num_actions=5, dtype="bfloat16", remat="block")
    c = ml_collections.ConfigDict(dict(teacher_model=dict(name="", overrides={})))
    assert teacher_model_config(c, student.replace(mean_flow=True)) == student
    c.teacher_model = ml_collections.ConfigDict(dict(name="tiny", overrides=dict(num_layers=4, num_actions=5)))
    t = teacher_model_config(c, student)
    assert t.num_layers == 4 and t.runtime == student.runtime and not t.mean_flow
    c.teacher_model.overrides = dict(num_layers=4)  # num_actions differs from the student's
    with pytest.raises(ValueError, match="num_actions: teacher 0 vs student 5"):
        teacher_model_config(c, student)


def _device_bytes(tree, shardings):
    """Bytes per device of `tree`'s leaves under `shardings` (the largest shard)."""
    return sum(
        int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings))
    )


@pytest.mark.parametrize("mode,which", [("tf_scm", "student"), ("sf_dmd", "student"), ("sf_dmd", "critic")])
def test_host_offloaded_ema_and_teacher(mode, which):
    """EMA and frozen teachers in pinned host memory: the step is split around them
    (`offload.make_step`), gives the one-jit step's result, keeps the EMA on the host, and its
    main jit's compiled device memory is the one-jit step's less at least the offloaded bytes."""
    trainer, state, frozen, batch = setup(mode)
    mesh = shd.make_mesh(4, 2)
    key = jax.random.key(7)
    b_sh, key_sh = shd.batch_shardings(batch, mesh, B), shd.replicated(key, mesh)
    results, memory = {}, {}
    for offload in (False, True):
        st_sh = shd.state_shardings(state, mesh, offload=("ema",) if offload else ())
        fr_sh = shd.state_shardings(frozen, mesh, offload=("teacher", "dmd_teacher") if offload else ())
        step = make_step(trainer, mesh, (st_sh, fr_sh, b_sh, key_sh), which, sf_steps=2)
        fresh = jax.tree.map(jnp.copy, state)  # the step donates it (device_put may share buffers)
        s, fr, b = jax.device_put(fresh, st_sh), jax.device_put(frozen, fr_sh), jax.device_put(batch, b_sh)
        memory[offload] = step.memory(s, fr, b, key)
        if offload:
            assert {x.sharding.memory_kind for x in jax.tree.leaves((fr.teacher, fr.dmd_teacher))} == {"pinned_host"}
            assert list(step.jits) == (["teacher", "main", "ema"] if which == "student" else ["main"])
            offloaded = _device_bytes(state.ema, st_sh.ema)
            if which == "student":
                offloaded += _device_bytes(frozen.teacher, fr_sh.teacher)  # sf_dmd: the dmd_teacher, same size
        results[offload] = step(s, fr, b, key)
    (ref_state, ref_m), (new_state, m) = results[False], results[True]
    assert float(m["loss"]) == pytest.approx(float(ref_m["loss"]), rel=1e-6)
    assert rel_tree(jax.device_get(new_state), jax.device_get(ref_state)) <= 1e-6
    ema_moved = rel_tree(jax.device_get(new_state.ema), jax.device_get(state.ema))
    assert (ema_moved > 0) == (which == "student")  # a critic step leaves the EMA alone
    assert {x.sharding.memory_kind for x in jax.tree.leaves(new_state.ema)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(new_state.params)} == {"device"}
    plain, split = memory[False]["main"]["total"], memory[True]["main"]["total"]
    print(f"{mode}-{which} compiled bytes/device: one jit {memory[False]}, split {memory[True]}, offloaded {offloaded}")
    assert plain - split >= offloaded, (plain, split, offloaded)
    with pytest.raises(ValueError, match="cannot offload"):
        shd.state_shardings(state, mesh, offload=("params",))


def test_teacher_pass_needs_a_teacher_mode_and_replay():
    trainer, state, frozen, batch = setup("teacher_tf")
    with pytest.raises(ValueError, match="has no teacher"):
        trainer.teacher_pass(state, frozen, batch, jax.random.key(0))
    trainer, state, frozen, batch = setup("sf_dmd")
    direct = Trainer(
        dataclasses.replace(trainer.cfg, sf_replay=False),
        trainer.apply,
        trainer.model_cfg,
        teacher_apply=trainer.teacher_apply,
    )
    with pytest.raises(ValueError, match="sf_replay"):
        jax.eval_shape(functools.partial(direct.teacher_pass, sf_steps=1), state, frozen, batch, jax.random.key(0))


def test_precompile_compiles_each_step_once_in_parallel():
    """`offload.precompile` compiles several steps concurrently; calling them afterwards compiles
    nothing more and gives the lazily compiled steps' results."""
    from crm_jax.training.offload import precompile

    trainer, state, frozen, batch = setup("sf_dmd")
    mesh = shd.make_mesh(1, 1)
    key = jax.random.key(7)
    shardings = (
        shd.state_shardings(state, mesh),
        shd.state_shardings(frozen, mesh),
        shd.batch_shardings(batch, mesh, B),
        shd.replicated(key, mesh),
    )
    plans = [("student", 1), ("critic", 2)]

    def steps():
        return [make_step(trainer, mesh, shardings, w, sf_steps=n) for w, n in plans]

    def run(step_list):  # each step donates its state: a copy each (copies made before counting)
        return [step(fresh, frozen, batch, key) for step, fresh in zip(step_list, copies.pop())]

    copies = [[jax.tree.map(jnp.copy, state) for _ in plans] for _ in range(2)]
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: (
            compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    pre = steps()
    assert precompile(pre, state, frozen, batch, key) > 0
    n_pre = len(compiles)
    assert n_pre >= len(plans)
    out = run(pre)
    assert len(compiles) == n_pre, "a precompiled step compiled again when called"
    ref = run(steps())  # fresh jits: compiled lazily
    for (s, m), (rs, rm) in zip(out, ref):
        assert float(m["loss"]) == float(rm["loss"])
        assert rel_tree(jax.device_get(s.params), jax.device_get(rs.params)) == 0.0


def test_teacher_forcing_dmd_scores_see_the_clean_rollout_as_context():
    """dmd_teacher_pattern="teacher_forcing": the real / fake scores of x_t are the noisy half of
    one call on `[sg(G) | x_t]`. Chunk 0 (no context) scores exactly as block-causally; later
    chunks differ, and do not depend on the noise of earlier chunks (they see G, not x_t)."""
    trainer, state, frozen, batch = setup("sf_dmd")
    T4 = 4
    ks = jax.random.split(jax.random.key(3), 3)
    G = jax.random.normal(ks[0], (2, T4, H, W, trainer.model_cfg.in_channels))
    x = jax.random.normal(ks[1], G.shape)
    t = jnp.array([0.3, 0.8])
    cond = dict(context=batch["context"][:2], actions=batch["actions"][:2, :1].repeat(T4, 1))
    scores = {}
    for kind in ("block_causal", "teacher_forcing"):
        tr = Trainer(
            dataclasses.replace(trainer.cfg, dmd_teacher_pattern=kind),
            trainer.apply,
            trainer.model_cfg,
            teacher_apply=trainer.teacher_apply,
        )
        sc = tr.score_cond(cond, G)
        assert ("tf_context" in sc) == (kind == "teacher_forcing")
        scores[kind] = tr.score_fn(frozen.dmd_teacher)(x, t, sc)
        if kind == "teacher_forcing":  # the same, by hand: one packed call, clean half at t = 0
            packed = trainer.teacher_apply(
                frozen.dmd_teacher,
                jnp.concatenate([G, x], 1),
                jnp.concatenate([jnp.zeros((2, T4)), jnp.broadcast_to(t[:, None], (2, T4))], 1),
                cond["context"],
                pattern=tr.cfg.pattern("teacher_forcing"),
                actions=jnp.concatenate([cond["actions"]] * 2, 1),
            )
            np.testing.assert_allclose(scores[kind], packed[:, T4:], rtol=1e-6, atol=1e-6)
            x2 = x.at[:, 0].set(jax.random.normal(ks[2], x[:, 0].shape))  # other noise in chunk 0 only
            moved = jnp.abs(tr.score_fn(frozen.dmd_teacher)(x2, t, sc) - scores[kind])
            assert float(jnp.max(moved[:, 1:])) == 0.0 and float(jnp.max(moved[:, 0])) > 0
    bc, tf = scores["block_causal"], scores["teacher_forcing"]
    np.testing.assert_allclose(tf[:, 0], bc[:, 0], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(tf[:, 1:] - bc[:, 1:]))) > 1e-3
    with pytest.raises(ValueError, match="dmd_teacher_pattern must be one of"):
        TrainConfig(mode="sf_dmd", dmd_teacher_pattern="causal")


@pytest.mark.parametrize("mode", ["sf_dmd", "rcm"])
def test_teacher_forcing_dmd_steps_train(mode):
    """SF-DMD (and rCM's) student and critic steps with teacher-forcing scores: finite, and they move
    the weights."""
    trainer, state, frozen, batch = setup(mode)
    tr = Trainer(
        dataclasses.replace(trainer.cfg, dmd_teacher_pattern="teacher_forcing"),
        trainer.apply,
        trainer.model_cfg,
        teacher_apply=trainer.teacher_apply,
    )
    for which in ("student", "critic"):
        new, m = run_step(tr, jax.tree.map(jnp.copy, state), frozen, batch, which=which)
        assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
        moved = new.params if which == "student" else new.critic
        before = state.params if which == "student" else state.critic
        assert rel_tree(moved, before) > 0


@pytest.mark.parametrize("kind", ["block_causal", "teacher_forcing"])
def test_replayed_and_direct_sf_dmd_gradients_agree(kind):
    """The DMD gradient of the student by the replayed per-chunk backward (sf_replay=True, from
    `_dmd_cotangent`) equals the direct backward through the rollout, in both DMD score layouts."""
    trainer, state, frozen, batch = setup("sf_dmd")
    k_sf, k_dmd = jax.random.split(jax.random.key(5))
    out = {}
    for replay in (True, False):
        tr = Trainer(
            dataclasses.replace(trainer.cfg, dmd_teacher_pattern=kind, sf_replay=replay),
            trainer.apply,
            trainer.model_cfg,
            teacher_apply=trainer.teacher_apply,
        )
        out[replay] = jax.jit(functools.partial(tr.dmd_grads, sf_steps=2))(state, frozen, batch, k_sf, k_dmd)
    (l_r, _, g_r), (l_d, _, g_d) = out[True], out[False]
    assert np.isfinite(float(l_r)) and float(l_r) == pytest.approx(float(l_d), rel=1e-6)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(g_d)) > 0
    assert rel_tree(g_r, g_d) < 1e-5
