"""crm_jax.diffusion: conversions, TrigFlow wrapper, guidance, samplers, grids, ODE samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax import diffusion as D


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
    """jax.jit with XLA's cheap CPU pipeline (tiny graphs; compile time dominates the tests)."""
    return jax.jit(f, compiler_options=FAST, **kw)


def randn(seed, shape):
    """Standard-normal test data from numpy (eager jax.random compiles threefry per shape: slow on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# ---------------------------------------------------------------- Gaussian toy data (analytic)


def _gauss(mu, sig):
    """Exact RF velocity and flow map for data N(mu, diag sig^2) (per trailing feature)."""

    def a(t):
        return jnp.sqrt((1 - t) ** 2 * sig**2 + t**2)

    def v(x, t, cond=None):
        tb = D.expand_time(t, x)
        return (tb - (1 - tb) * sig**2) / a(tb) ** 2 * (x - (1 - tb) * mu) - mu

    def flow(x, t, r):
        tb, rb = D.expand_time(t, x), D.expand_time(r, x)
        return (1 - rb) * mu + a(rb) / a(tb) * (x - (1 - tb) * mu)

    return v, flow


# ---------------------------------------------------------------- conversions


def test_time_conversion_round_trips(x64):
    t = jnp.linspace(0.0, 0.999, 101)
    s = D.rf_to_trig(t)
    sigma = D.rf_to_sigma(t)
    np.testing.assert_allclose(D.sigma_to_rf(sigma), t, atol=1e-12)
    np.testing.assert_allclose(D.trig_to_rf(s), t, atol=1e-12)
    np.testing.assert_allclose(D.trig_to_sigma(D.sigma_to_trig(sigma)), sigma, rtol=1e-10)
    np.testing.assert_allclose(D.sigma_to_trig(sigma), s, atol=1e-12)  # rf->sigma->trig == rf->trig
    np.testing.assert_allclose(D.trig_to_sigma(s), sigma, rtol=1e-9)
    s_grid = jnp.linspace(0.0, math.pi / 2, 33)
    np.testing.assert_allclose(D.rf_to_trig(D.trig_to_rf(s_grid)), s_grid, atol=1e-12)
    assert float(D.rf_to_trig(1.0)) == pytest.approx(math.pi / 2)
    assert float(D.trig_to_rf(math.pi / 2)) == pytest.approx(1.0)
    u = jnp.linspace(0.0, 1.0, 21)
    for k in (1.0, 3.0, 5.0, 0.5):
        np.testing.assert_allclose(D.unshift_time(D.shift_time(u, k), k), u, atol=1e-12)
        np.testing.assert_allclose(D.shift_time(D.unshift_time(u, k), k), u, atol=1e-12)
    np.testing.assert_allclose(D.shift_time(0.5, 5.0), 5 * 0.5 / (1 + 4 * 0.5))


def test_state_conversions_round_trip_and_agree(x64):
    x0, eps = randn(0, (2, 3, 4)), randn(1, (2, 3, 4))
    t = jnp.array([0.2, 0.9])
    s = D.rf_to_trig(t)
    sigma = D.rf_to_sigma(t)
    x_t = D.rf_noise(x0, eps, t)
    x_s = D.trig_noise(x0, eps, s)
    np.testing.assert_allclose(D.rf_to_trig_x(x_t, t), x_s, atol=1e-12)
    np.testing.assert_allclose(D.trig_to_rf_x(x_s, s), x_t, atol=1e-12)
    x_sig = x0 + D.expand_time(sigma, x0) * eps
    np.testing.assert_allclose(D.rf_to_sigma_x(x_t, t), x_sig, atol=1e-12)
    np.testing.assert_allclose(D.sigma_to_rf_x(x_sig, sigma), x_t, atol=1e-12)
    v = D.v_from_x0_eps(x0, eps)
    np.testing.assert_allclose(D.x0_from_v(x_t, t, v), x0, atol=1e-12)
    np.testing.assert_allclose(D.eps_from_v(x_t, t, v), eps, atol=1e-12)
    np.testing.assert_allclose(D.v_from_x0(x_t, t, x0), v, atol=1e-12)
    np.testing.assert_allclose(D.v_from_eps(x_t, t, eps), v, atol=1e-12)
    F = D.trig_velocity(x0, eps, s)
    np.testing.assert_allclose(D.x0_from_trig(x_s, s, F), x0, atol=1e-12)
    np.testing.assert_allclose(D.eps_from_trig(x_s, s, F), eps, atol=1e-12)
    np.testing.assert_allclose(D.trig_velocity_from_v(x_t, t, v), F, atol=1e-12)
    # per-frame times broadcast over trailing axes
    tf = jnp.array([[0.1, 0.5, 0.7], [0.3, 0.3, 0.99]])
    np.testing.assert_allclose(D.rf_noise(x0, eps, tf), (1 - tf[..., None]) * x0 + tf[..., None] * eps)


def test_trigflow_wrapper_true_velocity_gives_exact_F(x64):
    x0 = randn(0, (3, 2, 5))
    eps = randn(1, (3, 2, 5))
    true_v = lambda x, t, c: eps - x0
    for s in (jnp.array([0.0, 0.7, math.pi / 2]), jnp.array([[0.3, 1.2], [0.01, 1.5], [0.8, 0.8]])):
        x_s = D.trig_noise(x0, eps, s)
        x0_hat, F = D.trigflow_predict(true_v, x_s, s, None)
        sb = D.expand_time(s, x0)
        np.testing.assert_allclose(F, jnp.cos(sb) * eps - jnp.sin(sb) * x0, atol=1e-12)
        np.testing.assert_allclose(x0_hat, x0, atol=1e-12)
        # agrees with the docs/design.md §4 form (cos s x_s - x0_hat) / sin s where sin s > 0
        ok = np.asarray(jnp.broadcast_to(jnp.sin(sb) > 1e-3, F.shape))
        design = (jnp.cos(sb) * x_s - x0_hat) / jnp.sin(sb)
        np.testing.assert_allclose(np.asarray(F)[ok], np.asarray(design)[ok], atol=1e-9)
        np.testing.assert_allclose(D.trigflow_fn(true_v)(x_s, s, None), F)


def test_trigflow_wrapper_feeds_network_rf_state_and_time(x64):
    seen = {}

    def net(x, t, c):
        seen["x"], seen["t"] = x, t
        return jnp.zeros_like(x)

    x0, eps = jnp.ones((2, 3)), 2 * jnp.ones((2, 3))
    t = jnp.array([0.25, 0.6])
    s = D.rf_to_trig(t)
    D.trigflow_predict(net, D.trig_noise(x0, eps, s), s, None)
    np.testing.assert_allclose(seen["t"], t, atol=1e-12)
    np.testing.assert_allclose(seen["x"], D.rf_noise(x0, eps, t), atol=1e-12)


def test_cfg_and_guided():
    def net(x, t, c):
        return x * c["scale"]

    x = jnp.ones((2, 3))
    t = jnp.array([0.5, 0.5])
    c, u = {"scale": jnp.array([2.0, 2.0])[:, None]}, {"scale": jnp.array([1.0, 1.0])[:, None]}
    out = D.guided_velocity(net, x, t, c, u, 5.0)
    np.testing.assert_allclose(out, 1.0 + 5.0 * (2.0 - 1.0))
    np.testing.assert_allclose(D.guided(net, u, 5.0)(x, t, c), out)
    np.testing.assert_allclose(D.cfg(2.0, 1.0, 3.0), 4.0)
    calls = []
    D.guided_velocity(lambda x, t, c: calls.append(c) or x, x, t, c, u, 1.0)
    assert len(calls) == 1  # guidance 1: only the conditional call
    with pytest.raises(ValueError, match="uncond"):
        D.guided(net, None, 3.0)


# ---------------------------------------------------------------- samplers


def test_lognormal_sampler_is_logit_normal():
    t = D.sample_lognormal_t(jax.random.key(0), (20000,), p_mean=-0.8, p_std=1.6)
    assert t.shape == (20000,) and float(t.min()) > 0 and float(t.max()) < 1
    logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
    assert abs(logit.mean() - (-0.8)) < 0.05 and abs(logit.std() - 1.6) < 0.05
    np.testing.assert_array_equal(t, D.lognormal_sampler(-0.8, 1.6)(jax.random.key(0), (20000,)))


def test_uniform_shift_sampler():
    t = D.sample_uniform_shift_t(jax.random.key(0), (20000,), shift=5.0)
    assert float(t.min()) >= 0 and float(t.max()) < 1
    u = np.asarray(D.unshift_time(t, 5.0))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - math.sqrt(1 / 12)) < 0.01
    assert float(jnp.mean(t)) > 0.7  # shift 5 pushes mass to high noise
    u2 = jax.random.uniform(jax.random.key(0), (20000,))
    np.testing.assert_allclose(t, 5 * u2 / (1 + 4 * u2), rtol=1e-6)


def test_block_times_constant_within_blocks():
    sizes = D.block_sizes(7, 3, 1)
    assert sizes == (1, 3, 3)
    assert D.block_sizes(6, 3) == (3, 3) and D.block_sizes(5, 2, 1) == (1, 2, 2) and D.block_sizes(4, 3) == (3, 1)
    t = D.sample_block_times(jax.random.key(0), 4, sizes)
    assert t.shape == (4, 7)
    t = np.asarray(t)
    assert np.all(t[:, 1:4] == t[:, 1:2]) and np.all(t[:, 4:7] == t[:, 4:5])
    assert len(np.unique(t[0])) == 3
    np.testing.assert_array_equal(D.expand_block_times(jnp.array([[1.0, 2.0]]), (2, 1)), [[1.0, 1.0, 2.0]])
    with pytest.raises(ValueError):
        D.expand_block_times(jnp.ones((2, 3)), (2, 1))
    with pytest.raises(ValueError):
        D.block_sizes(0, 3)


# ---------------------------------------------------------------- grids


def test_few_step_grid():
    np.testing.assert_allclose(D.few_step_times(4), [1600 / 1601, 15 / 16, 5 / 6, 5 / 8, 0.0])
    np.testing.assert_allclose(D.few_step_times(2, sigma_max=80.0), [80 / 81, 15 / 16, 0.0])
    np.testing.assert_allclose(D.few_step_times(1), [1600 / 1601, 0.0])
    with pytest.raises(ValueError):
        D.few_step_times(5)
    with pytest.raises(ValueError):
        D.few_step_times(0)


def test_shifted_grid():
    g = D.shifted_time_grid(48, shift=5.0)
    assert g.shape == (49,) and g[0] == pytest.approx(1.0) and g[-1] == 0.0
    assert np.all(np.diff(g) < 0)
    np.testing.assert_allclose(D.unshift_time(jnp.asarray(g), 5.0), np.linspace(1, 0, 49), atol=1e-6)
    g2 = D.shifted_time_grid(10, shift=3.0, t_max=1600 / 1601)
    assert g2[0] == pytest.approx(1600 / 1601)
    np.testing.assert_allclose(D.shifted_time_grid(4, shift=1.0), [1, 0.75, 0.5, 0.25, 0])


# ---------------------------------------------------------------- ODE samplers


def test_euler_sampler_matches_exact_flow_map(x64):
    mu, sig = jnp.array([0.5, -1.0]), jnp.array([0.7, 1.3])
    v, flow = _gauss(mu, sig)
    noise = randn(0, (16, 3, 2))
    exact = flow(noise, jnp.ones(16), jnp.zeros(16))
    errs = []
    for n in (50, 100):
        x = jit(lambda z: D.euler_sample(v, z, None, num_steps=n, shift=3.0))(noise)
        errs.append(float(jnp.max(jnp.abs(x - exact))))
    assert errs[0] < 0.15 and errs[1] < errs[0] * 0.6  # first-order convergence
    x, (traj, ts) = jit(lambda z: D.euler_sample(v, z, None, num_steps=8, return_trajectory=True))(noise)
    assert traj.shape == (16, 9, 3, 2) and ts.shape == (9,)
    np.testing.assert_array_equal(traj[:, 0], noise)
    np.testing.assert_array_equal(traj[:, -1], x)


def test_euler_sampler_cfg():
    def net(x, t, c):
        return jnp.zeros_like(x) + c[:, None]

    noise = jnp.zeros((2, 3))
    x = D.euler_sample(net, noise, jnp.array([1.0, 1.0]), num_steps=4, uncond=jnp.array([0.0, 0.0]), guidance=3.0)
    np.testing.assert_allclose(x, -3.0 * jnp.ones((2, 3)), rtol=1e-6)  # integrates v = 3 from t=1 to 0


def test_few_step_sample_with_exact_consistency_student(x64):
    mu, sig = jnp.array([0.5, -1.0]), jnp.array([0.7, 0.3])
    v, flow = _gauss(mu, sig)

    def student(x, t, c):  # x0_hat = x - t v = flow(x, t -> 0): exact consistency function
        return (x - flow(x, t, jnp.zeros_like(t))) / D.expand_time(t, x)

    noise = randn(0, (4000, 2))
    for n in (1, 4):
        x = jit(lambda z, k: D.few_step_sample(student, z, None, k, num_steps=n))(noise, jax.random.key(n))
        np.testing.assert_allclose(jnp.mean(x, 0), mu, atol=0.05)
        np.testing.assert_allclose(jnp.std(x, 0), sig, atol=0.05)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises():
    x = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="does not match"):
        D.expand_time(jnp.ones(3), x)
    with pytest.raises(ValueError, match="does not match"):
        D.rf_noise(x, x, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="must lie in"):
        D.check_time(jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError):
        D.check_time(jnp.array([jnp.nan]))
    with pytest.raises(ValueError, match="leading"):
        D.check_cond({"text": jnp.ones((3, 7))}, 2)
    D.check_cond({"text": jnp.ones((2, 7)), "neg": jnp.ones((1, 7)), "n": 3}, 2)
    with pytest.raises(ValueError):
        D.pack_teacher_forcing(x, jnp.ones((2, 2, 4)), jnp.ones(2))
    with pytest.raises(ValueError):
        D.euler_sample(lambda x, t, c: x, x, None, times=[0.0, 1.0])
    with pytest.raises(ValueError, match="shape"):
        D.trigflow_predict(lambda x, t, c: x[:, :1], x, jnp.ones(2), None)


def test_pack_teacher_forcing():
    x0, xt = jnp.zeros((2, 3, 1)), jnp.ones((2, 3, 1))
    xp, tp = D.pack_teacher_forcing(x0, xt, jnp.array([0.3, 0.6]))
    assert xp.shape == (2, 6, 1) and tp.shape == (2, 6)
    np.testing.assert_allclose(tp, [[0, 0, 0, 0.3, 0.3, 0.3], [0, 0, 0, 0.6, 0.6, 0.6]], rtol=1e-6)
    np.testing.assert_array_equal(D.unpack_noisy(xp, 3), xt)
