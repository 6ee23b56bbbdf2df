"""crm_jax.losses: exactness on analytic Gaussian data, autodiff structure, metrics and input checks."""

import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crm_jax import diffusion as D
from crm_jax import losses as L

sg = jax.lax.stop_gradient


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def randn(seed, shape):
    """Standard-normal test data from numpy (eager jax.random compiles threefry per shape: slow on CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


# ---------------------------------------------------------------- analytic Gaussian data
# Data x0 ~ N(mu, diag sig^2) over the last axis. For RF x_t = (1-t) x0 + t eps, a(t)^2 = (1-t)^2 sig^2 + t^2:
#   exact velocity      v(x, t)     = (t - (1-t) sig^2) / a(t)^2 * (x - (1-t) mu) - mu
#   exact flow map      Phi_{t->r}  = (1-r) mu + a(r)/a(t) (x - (1-t) mu)
#   average velocity    u(z, r, t)  = (z - Phi_{t->r}(z)) / (t - r)
#                                   = (z - (1-t) mu) [(t + r) - sig^2 (2 - t - r)] / (a_t (a_t + a_r)) - mu
# The exact consistency student (x0_hat = x_t - t v_theta = Phi_{t->0}) is v_theta(x, t) = u(x, 0, t).

MU = (0.5, -1.0, 2.0)
SIG = (0.7, 1.3, 0.4)


def _a(t, sig):
    return jnp.sqrt((1 - t) ** 2 * sig**2 + t**2)


def v_exact(x, t, p):
    mu, sig = p["mu"], jnp.exp(p["ls"])
    tb = D.expand_time(t, x)
    return (tb - (1 - tb) * sig**2) / _a(tb, sig) ** 2 * (x - (1 - tb) * mu) - mu


def u_exact(z, r, t, p):
    mu, sig = p["mu"], jnp.exp(p["ls"])
    tb, rb = D.expand_time(t, z), D.expand_time(r, z)
    at, ar = _a(tb, sig), _a(rb, sig)
    return (z - (1 - tb) * mu) * ((tb + rb) - sig**2 * (2 - tb - rb)) / (at * (at + ar)) - mu


def flow_map(x, t, r, p):
    mu, sig = p["mu"], jnp.exp(p["ls"])
    tb, rb = D.expand_time(t, x), D.expand_time(r, x)
    return (1 - rb) * mu + _a(rb, sig) / _a(tb, sig) * (x - (1 - tb) * mu)


def true_params():
    return {"mu": jnp.array(MU), "ls": jnp.log(jnp.array(SIG))}


def perturbed_params():
    p = true_params()
    return {"mu": p["mu"] + jnp.array([0.3, -0.2, 0.1]), "ls": p["ls"] + jnp.array([0.2, -0.15, 0.1])}


def teacher_fn(x, t, cond):
    return v_exact(x, t, true_params())


def student(p):
    return lambda x, t, cond: u_exact(x, jnp.zeros_like(t), t, p)


def student_pair(p):
    """(grad forward, jvp forward on stop-gradient params)."""
    return student(p), student(sg(p))


def data(B=32, T=4, key=0):
    p = true_params()
    return p["mu"] + jnp.exp(p["ls"]) * randn(key, (B, T, 3))


def dist(p, q):
    return sum(float(jnp.sum((p[k] - q[k]) ** 2)) for k in p)


def max_abs(tree):
    return max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(tree))


# ---------------------------------------------------------------- a small random network (frames interact)


def make_net(seed, F=3, H=8):
    params = {
        "W1": 0.5 * randn(seed, (F, H)),
        "b": randn(seed + 1, (H,)),
        "c": randn(seed + 2, (H,)),
        "W2": 0.5 * randn(seed + 3, (H, F)),
    }

    def net(p, x, t, cond):
        tb = D.expand_time(t, x)
        h = jnp.tanh(x @ p["W1"] + tb * p["b"] + jnp.cos(3 * tb) * p["c"])
        h = jnp.cumsum(h, axis=1) / h.shape[1]  # causal mixing over frames
        return h @ p["W2"]

    return params, net


SCM_FORMS = {
    "trigflow": lambda fn, jfn, te, x0, key, **kw: L.scm_trigflow_loss(fn, jfn, te, x0, None, key, **kw),
    "rf": lambda fn, jfn, te, x0, key, **kw: L.scm_rf_loss(fn, jfn, te, x0, None, key, teacher_forcing=False, **kw),
    "rf_tf": lambda fn, jfn, te, x0, key, **kw: L.scm_rf_loss(fn, jfn, te, x0, None, key, teacher_forcing=True, **kw),
}


# ---------------------------------------------------------------- sCM: exactness on Gaussian data

# Tests jit their computations with XLA's cheap CPU pipeline: one quick compile costs far less CPU time than
# op-by-op eager dispatch, and optimisation passes do not matter for these tiny graphs.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f):
    return jax.jit(f, compiler_options=FAST)


def vg(f):
    """jit(value_and_grad(f, has_aux=True))."""
    return jit(jax.value_and_grad(f, has_aux=True))


@pytest.mark.parametrize("form", list(SCM_FORMS))
def test_scm_exact_student_and_perturbed_student(x64, form):
    """Exact teacher + exact consistency student: g = 0 and the gradient vanishes. A perturbed student gets a
    non-zero gradient whose descent direction points back to the exact parameters."""
    x0 = data()
    p_true, p0 = true_params(), perturbed_params()

    def loss(p):
        fn, jfn = student_pair(p)
        return SCM_FORMS[form](fn, jfn, teacher_fn, x0, jax.random.key(1))

    f = vg(loss)
    (val, m), grads = f(p_true)
    assert float(m["g_norm"]) < 1e-10  # g = 0 for the exact consistency function
    assert float(val) < 1e-18
    assert max_abs(grads) < 1e-9  # and the loss gradient vanishes
    assert float(m["tangent_norm"]) > 0.1 and float(m["nan_frac"]) == 0.0

    (val, m), grads = f(p0)
    assert max_abs(grads) > 1e-2 and float(m["g_norm"]) > 0.1
    # the returned loss includes the factor 100; at the value F - sg(F) = 0, so it is 100 * mean ||g_hat||^2
    # with ||g_hat|| = ||g|| / (||g|| + 0.1) < 1
    np.testing.assert_allclose(val, 100.0 * m["loss_unscaled"])
    assert 0.0 < float(m["loss_unscaled"]) < 1.0
    # descent direction has positive overlap with the direction to the exact parameters ...
    overlap = sum(float(jnp.sum(-grads[k] * (p_true[k] - p0[k]))) for k in p0)
    assert overlap > 0
    # ... and a small gradient step reduces the distance to them
    p1 = jax.tree.map(lambda a, g: a - 1e-3 * g, p0, grads)
    assert dist(p1, p_true) < dist(p0, p_true)


@pytest.mark.parametrize("form", list(SCM_FORMS))
def test_scm_without_normalisation_weighs_each_sample_by_its_g(x64, form):
    """normalise=False (the study's ablation) regresses onto g itself: for one sample the loss is ||g||^2
    (normalised: (||g|| / (||g|| + 0.1))^2) and the gradient is (||g|| + 0.1) times the normalised one."""
    x0 = data(B=3, key=5)
    t = jnp.array([0.2, 0.55, 0.9])
    eps = randn(6, x0.shape)
    p0 = perturbed_params()
    norms = []
    for i in range(3):

        def loss(p, normalise):
            fn, jfn = student_pair(p)
            return SCM_FORMS[form](
                fn,
                jfn,
                teacher_fn,
                x0[i : i + 1],
                jax.random.key(1),
                t=t[i : i + 1],
                noise=eps[i : i + 1],
                normalise=normalise,
            )

        (_, m_raw), g_raw = vg(lambda p: loss(p, False))(p0)
        (_, m_hat), g_hat = vg(lambda p: loss(p, True))(p0)
        n = float(m_raw["g_norm"])
        np.testing.assert_allclose(m_hat["g_norm"], n, rtol=1e-12)
        np.testing.assert_allclose(m_raw["loss_unscaled"], n**2, rtol=1e-10)
        np.testing.assert_allclose(m_hat["loss_unscaled"], (n / (n + 0.1)) ** 2, rtol=1e-10)
        for k in p0:
            np.testing.assert_allclose(g_raw[k], (n + 0.1) * g_hat[k], rtol=1e-9, atol=1e-12)
        norms.append(n)
    assert max(norms) > 2 * min(norms)  # samples really differ in ||g||: the weighting matters


def _mean_norm(x):
    return jnp.mean(jnp.sqrt(jnp.sum(x**2, axis=tuple(range(1, x.ndim)))))


def test_scm_trigflow_warmup_term(x64):
    """Exact student, r < 1: only warm-up terms survive,
    g = cos s (cos s - sqrt(1 - r^2 sin^2 s)) (F - F_T) + (1 - r) cos s sin s x_s."""
    x0 = data(B=8)
    t = jnp.linspace(0.05, 0.95, 8)
    eps = randn(3, x0.shape)
    fn, jfn = student_pair(true_params())
    r = 0.25

    @jit
    def run(step):  # step is traced, as in a jitted train step
        _, m = L.scm_trigflow_loss(
            fn, jfn, teacher_fn, x0, None, jax.random.key(0), t=t, noise=eps, step=step, tangent_warmup=4
        )
        s = D.rf_to_trig(t)
        x_s = D.trig_noise(x0, eps, s)
        F = D.trigflow_fn(fn)(x_s, s, None)
        F_T = D.trigflow_fn(teacher_fn)(x_s, s, None)
        c, sn = D.expand_time(jnp.cos(s), x0), D.expand_time(jnp.sin(s), x0)
        expect = c * (c - jnp.sqrt(1 - r**2 * sn**2)) * (F - F_T) + (1 - r) * c * sn * x_s
        return m, _mean_norm(expect)

    m, want = run(jnp.asarray(1))
    np.testing.assert_allclose(m["g_norm"], want, rtol=1e-9)
    np.testing.assert_allclose(m["warmup_ratio"], r)


def test_scm_rf_warmup_term(x64):
    """Exact student, r < 1: g = (1 - r) (v_T - v_theta)."""
    x0 = data(B=8)
    t = jnp.linspace(0.05, 0.95, 8)
    eps = randn(3, x0.shape)
    fn, jfn = student_pair(true_params())

    @jit
    def run():
        _, m = L.scm_rf_loss(
            fn,
            jfn,
            teacher_fn,
            x0,
            None,
            jax.random.key(0),
            t=t,
            noise=eps,
            step=3,
            tangent_warmup=4,
            teacher_forcing=True,
        )
        x_t = D.rf_noise(x0, eps, t)
        return m, _mean_norm(0.25 * (teacher_fn(x_t, t, None) - fn(x_t, t, None)))

    m, want = run()
    np.testing.assert_allclose(m["g_norm"], want, rtol=1e-9)


# ---------------------------------------------------------------- jvp vs finite differences


def test_jvp_time_derivative_matches_central_difference(x64):
    params, net = make_net(0)
    x = randn(1, (2, 4, 3))
    dx = randn(2, (2, 4, 3))
    s = jnp.array([0.4, 1.1])
    F = D.trigflow_fn(lambda x_, t_, c: net(params, x_, t_, c))
    h = 1e-5

    @jit
    def run():
        _, dF = L.jvp_time_derivative(F, x, s, None, dx)
        return dF, (F(x + h * dx, s + h, None) - F(x - h * dx, s - h, None)) / (2 * h)

    dF, fd = run()
    np.testing.assert_allclose(dF, fd, rtol=1e-6, atol=1e-8)


def test_scm_tangents_match_finite_differences(x64):
    """The loss' tangent (reported as tangent_norm) equals a central difference of the network along
    the teacher ODE, for TrigFlow (cos s sin s dF/ds) and packed TF-RF (dv/dt, context frozen)."""
    params, net = make_net(0)
    fn = lambda x, t, c: net(params, x, t, c)
    x0 = randn(1, (3, 4, 3))
    eps = randn(2, (3, 4, 3))
    t = jnp.array([0.2, 0.5, 0.8])
    h = 1e-5

    @jit
    def trig():
        _, m = L.scm_trigflow_loss(fn, fn, teacher_fn, x0, None, jax.random.key(0), t=t, noise=eps)
        s = D.rf_to_trig(t)
        x_s = D.trig_noise(x0, eps, s)
        F_T = D.trigflow_fn(teacher_fn)(x_s, s, None)
        Ff = D.trigflow_fn(fn)
        fd = (Ff(x_s + h * F_T, s + h, None) - Ff(x_s - h * F_T, s - h, None)) / (2 * h)
        return m, _mean_norm(D.expand_time(jnp.cos(s) * jnp.sin(s), fd) * fd)

    @jit
    def rf_tf():
        _, m = L.scm_rf_loss(fn, fn, teacher_fn, x0, None, jax.random.key(0), t=t, noise=eps, teacher_forcing=True)
        x_t = D.rf_noise(x0, eps, t)
        xp, tp = D.pack_teacher_forcing(x0, x_t, t)
        v_T = D.unpack_noisy(teacher_fn(xp, tp, None), 4)

        def noisy(xn, tn):  # network output on the noisy half, clean context held fixed
            a, b = D.pack_teacher_forcing(x0, xn, tn)
            return D.unpack_noisy(fn(a, b, None), 4)

        fd = (noisy(x_t + h * v_T, t + h) - noisy(x_t - h * v_T, t - h)) / (2 * h)
        return m, _mean_norm(fd)

    for run in (trig, rf_tf):
        m, want = run()
        np.testing.assert_allclose(m["tangent_norm"], want, rtol=1e-6)


# ---------------------------------------------------------------- teacher-forcing sCM structure


def test_tf_scm_context_tangent_is_zero(x64):
    """A jvp network whose noisy output picks up alpha * (context tangent) gives the same loss for any alpha:
    the context tangent is exactly zero. Perturbing the teacher's (unused) context output changes nothing."""
    params, net = make_net(0)
    x0 = randn(1, (2, 4, 3))
    T = 4

    def fn(x, t, c):
        return net(params, x, t, c)

    def spy(alpha):
        def jfn(x, t, c):
            ctx = x[:, :T]
            leak = alpha * (ctx - sg(ctx))  # value 0, tangent = alpha * context tangent
            return fn(x, t, c) + jnp.concatenate([jnp.zeros_like(ctx), leak], axis=1)

        return jfn

    def teacher_ctx(beta):
        def te(x, t, c):
            out = teacher_fn(x, t, c)
            return out.at[:, :T].add(beta)

        return te

    f = jit(lambda a, b: L.scm_rf_loss(fn, spy(a), teacher_ctx(b), x0, None, jax.random.key(5)))
    outs = [f(a, b) for a, b in [(0.0, 0.0), (1e3, 0.0), (0.0, 1e3)]]
    for o in outs[1:]:
        assert float(o[0]) == float(outs[0][0])
        assert float(o[1]["tangent_norm"]) == float(outs[0][1]["tangent_norm"])
    # control: the spy does detect a non-zero context tangent
    xp = jnp.concatenate([x0, x0], axis=1)
    tp = jnp.full((2, 2 * T), 0.5)
    control = jit(lambda a: jax.jvp(lambda x: spy(a)(x, tp, None), (xp,), (jnp.ones_like(xp),))[1])
    d1, d0 = control(1e3), control(0.0)
    assert float(jnp.max(jnp.abs(d1 - d0))) > 1.0


def test_tf_scm_per_frame_batch_equals_mean_of_per_sample_losses(x64):
    params, net = make_net(0)
    fn = lambda x, t, c: net(params, x, t, c["emb"][:, None, None] * x)  # uses cond per sample
    teacher = lambda x, t, c: net(params, 1.1 * x, t, c)
    jfn = fn
    B, T = 3, 4
    x0 = randn(1, (B, T, 3))
    eps = randn(2, (B, T, 3))
    t = jnp.asarray(np.random.default_rng(3).uniform(0.05, 0.95, (B, T)))  # per-frame times
    cond = {"emb": jnp.array([0.5, 1.0, 1.5])}
    f = jit(lambda x0_, c_, t_, e_: L.scm_rf_loss(fn, jfn, teacher, x0_, c_, jax.random.key(0), t=t_, noise=e_))
    full, m = f(x0, cond, t, eps)
    per = [f(x0[b : b + 1], {"emb": cond["emb"][b : b + 1]}, t[b : b + 1], eps[b : b + 1]) for b in range(B)]
    np.testing.assert_allclose(full, np.mean([float(o[0]) for o in per]), rtol=1e-12)
    np.testing.assert_allclose(m["g_norm"], np.mean([float(o[1]["g_norm"]) for o in per]), rtol=1e-12)


@pytest.mark.parametrize("form", ["trigflow", "rf_tf"])
def test_scm_nan_samples_are_masked_and_counted(form):
    params, net = make_net(0)
    x0 = randn(1, (4, 4, 3))

    def loss(p):
        fn = lambda x, t, c: net(p, x, t, c)

        def jfn(x, t, c):  # jvp pass blows up on sample 0 only
            out = net(sg(p), x, t, c)
            return out.at[0].multiply(jnp.nan)

        return SCM_FORMS[form](fn, jfn, teacher_fn, x0, jax.random.key(2))

    (val, m), grads = vg(loss)(params)
    assert np.isfinite(float(val)) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert float(m["nan_frac"]) == 0.25 and int(m["nan_count"]) == 1
    assert max_abs(grads) > 0


def _jvp_only_net(net):
    """The same network as a custom_jvp op whose tangent passes through a primitive without differentiation
    rules: one jax.jvp works, differentiating that jvp again does not -- like the attention kernels' jvp op."""
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    tangent_only = Primitive("tangent_only_test")
    tangent_only.def_impl(lambda x: x)
    tangent_only.def_abstract_eval(lambda x: x)
    mlir.register_lowering(tangent_only, mlir.lower_fun(lambda x: x, multiple_results=False))

    @jax.custom_jvp
    def f(p, x, t):
        return net(p, x, t, None)

    @f.defjvp
    def f_jvp(primals, tangents):
        out, tan = jax.jvp(lambda p, x, t: net(p, x, t, None), primals, tangents)
        return out, tangent_only.bind(tan)

    return lambda p, x, t, c: f(p, x, t)


@pytest.mark.parametrize("form", ["trigflow", "rf_tf"])
def test_jvp_pass_is_never_reverse_differentiated(form):
    """With jvp_fn on stop-gradient params, jax.grad of the loss never differentiates the jvp pass, so a
    jvp-only network works there; closing jvp_fn over the live params instead fails."""
    params, net = make_net(0)
    jnet = _jvp_only_net(net)
    x0 = randn(1, (2, 4, 3))

    def loss(p, jvp_params):
        return SCM_FORMS[form](
            lambda x, t, c: net(p, x, t, c),
            lambda x, t, c: jnet(jvp_params(p), x, t, c),
            teacher_fn,
            x0,
            jax.random.key(0),
        )

    (val, m), g = vg(lambda p: loss(p, sg))(params)
    assert np.isfinite(float(val)) and max_abs(g) > 0 and float(m["tangent_norm"]) > 0
    with pytest.raises(NotImplementedError, match="Differentiation rule"):
        jax.grad(lambda p: loss(p, lambda q: q)[0])(params)


# ---------------------------------------------------------------- MeanFlow


def test_meanflow_target_equals_exact_average_velocity(x64):
    p = true_params()
    z = randn(0, (6, 2, 3))
    t = jnp.array([0.9, 0.7, 0.5, 0.3, 0.6, 0.99])
    r = jnp.array([0.1, 0.7, 0.2, 0.0, 0.59, 0.5])  # includes r == t and r == 0
    u_fn = lambda z_, r_, t_, c: u_exact(z_, r_, t_, p)

    @jit
    def run():
        target, _ = L.meanflow_target(u_fn, z, r, t, v_exact(z, t, p), None)
        return target, u_exact(z, r, t, p), z - D.expand_time(t - r, z) * target, flow_map(z, t, r, p)

    target, u, z_r, z_r_exact = run()
    np.testing.assert_allclose(target, u, atol=1e-12)
    np.testing.assert_allclose(z_r, z_r_exact, atol=1e-12)  # u is the average velocity: z_r = z_t - (t - r) u


def test_meanflow_exact_and_perturbed(x64):
    x0 = data()
    p_true, p0 = true_params(), perturbed_params()

    def loss(p):
        u = lambda z, r, t, c: u_exact(z, r, t, p)
        uj = lambda z, r, t, c: u_exact(z, r, t, sg(p))
        return L.meanflow_loss(u, uj, x0, None, jax.random.key(1), teacher_fn=teacher_fn, r_equals_t_fraction=0.25)

    f = vg(loss)
    (val, m), g = f(p_true)
    assert float(m["err_sq"]) < 1e-20 and max_abs(g) < 1e-8
    _, g = f(p0)
    assert max_abs(g) > 1e-3
    assert sum(float(jnp.sum(-g[k] * (p_true[k] - p0[k]))) for k in p0) > 0
    p1 = jax.tree.map(lambda a, b: a - 1e-3 * b, p0, g)
    assert dist(p1, p_true) < dist(p0, p_true)


def test_meanflow_time_sampler_and_default_velocity():
    r, t = jit(lambda k: L.sample_meanflow_times(k, 4000, r_equals_t_fraction=0.75))(jax.random.key(0))
    assert bool(jnp.all(r <= t)) and bool(jnp.all((t > 0) & (t < 1)))
    assert abs(float(jnp.mean(r == t)) - 0.75) < 0.03
    # without a teacher, v = eps - x0 and, with r = t, the target is v itself (du/dt weight t - r = 0)
    x0 = randn(1, (2, 3))
    eps = randn(2, (2, 3))
    u = lambda z, r, t, c: jnp.zeros_like(z)
    tt = jnp.array([0.3, 0.6])
    _, m = jit(lambda: L.meanflow_loss(u, u, x0, None, jax.random.key(0), r=tt, t=tt, noise=eps, adaptive_p=0.0))()
    np.testing.assert_allclose(m["err_sq"], jnp.mean(jnp.sum((eps - x0) ** 2, axis=1)), rtol=1e-6)


# ---------------------------------------------------------------- dCM


def test_dcm_times_are_adjacent_on_shifted_grid(x64):
    both = jit(
        lambda k: (
            L.dcm_times(k, 100, num_steps=48, shift=5.0, dtype=jnp.float64),
            L.dcm_times(k, 100, num_steps=48, shift=5.0, discrete=True, dtype=jnp.float64),
        )
    )
    (t0, t1), (d0, d1) = jax.tree.map(np.asarray, both(jax.random.key(0)))
    np.testing.assert_allclose(t0 / (5 - 4 * t0) - t1 / (5 - 4 * t1), 1 / 48, atol=1e-12)  # unshifted gap 1/N
    assert np.all(t0 > t1) and np.all(t1 >= 0) and np.all(t0 <= 1)
    t0, t1 = d0, d1
    grid = D.shifted_time_grid(48, 5.0)
    assert all(np.min(np.abs(grid - float(a))) < 1e-12 for a in t0)
    assert all(np.min(np.abs(grid - float(a))) < 1e-12 for a in t1)


@pytest.mark.parametrize("tf", [False, True])
def test_dcm_exact_vs_perturbed(x64, tf):
    """With the exact teacher and exact consistency student only the Euler error of the teacher step remains:
    the loss is O(dt^4) against O(dt^2) for a perturbed student, so their ratio falls ~100x when N grows 10x."""
    x0 = data()
    p_true, p0 = true_params(), perturbed_params()
    shapes = []

    def te(x, t, c):
        shapes.append(x.shape)
        return teacher_fn(x, t, c)

    f = vg(lambda p, t0, t1: L.dcm_loss(student(p), te, x0, None, jax.random.key(1), teacher_forcing=tf, t0=t0, t1=t1))
    ratios = []
    for n in (48, 480):
        t0, t1 = jit(lambda k: L.dcm_times(k, x0.shape[0], num_steps=n, dtype=jnp.float64))(jax.random.key(1))
        (exact, _), g_exact = f(p_true, t0, t1)
        (pert, m), g = f(p0, t0, t1)
        ratios.append(float(exact) / float(pert))
        if n == 48:
            assert float(exact) < 0.1 * float(pert)
            np.testing.assert_allclose(pert, 100 * m["loss_unscaled"])
            p1 = jax.tree.map(lambda a, b: a - 1e-4 * b, p0, g)
            assert dist(p1, p_true) < dist(p0, p_true)
    assert ratios[1] < ratios[0] / 30
    assert shapes[0] == ((32, 8, 3) if tf else (32, 4, 3))  # TF-dCM packs [x0 | x_t]


def test_dcm_uses_guided_teacher_step(x64):
    """One Euler step with the CFG teacher: x_t1 = x_t0 - (t0 - t1) (v_u + w (v_c - v_u))."""
    x0 = jnp.zeros((2, 3))
    eps = jnp.ones((2, 3))
    t0, t1 = jnp.array([0.8, 0.6]), jnp.array([0.7, 0.5])
    te = lambda x, t, c: jnp.zeros_like(x) + c[:, None]
    fn = lambda x, t, c: jnp.zeros_like(x)  # x0_hat(x, t) = x
    loss, _ = jit(
        lambda: L.dcm_loss(
            fn,
            te,
            x0,
            jnp.ones(2),
            jax.random.key(0),
            uncond=jnp.zeros(2),
            guidance=4.0,
            t0=t0,
            t1=t1,
            noise=eps,
            loss_scale=1.0,
        )
    )()
    # x0_hat(x_t0) - x0_hat(x_t1) = (t0 - t1) * 4 per element; 3 elements per sample
    np.testing.assert_allclose(loss, np.mean(3 * (4 * (t0 - t1)) ** 2), rtol=1e-9)


# ---------------------------------------------------------------- DMD and critic


def test_dmd_equal_scores_give_exactly_zero_gradient():
    params, net = make_net(0)
    G = randn(1, (4, 4, 3))
    same = lambda x, t, c: net(params, x, t, c)
    (val, m), g = vg(lambda G_: L.dmd_loss(G_, same, same, None, jax.random.key(2)))(G)
    assert float(val) == 0.0 and float(jnp.max(jnp.abs(g))) == 0.0 and float(m["dmd_grad_norm"]) == 0.0


def test_dmd_sgd_step_moves_generator_toward_real(x64):
    """Toy generator G = m + s z; real score: exact N(mu, sig^2) teacher; fake score: exact velocity of the
    generator's own distribution. One SGD step on (m, log s) moves the generator toward the real data."""
    p_real = {"mu": jnp.array([0.5, -1.0, 2.0]), "ls": jnp.log(jnp.array([0.7, 1.3, 0.4]))}
    gen = {"m": jnp.array([1.5, 0.0, 1.0]), "ls": jnp.log(jnp.array([1.2, 0.6, 1.0]))}
    z = randn(0, (512, 3))
    real = lambda x, t, c: v_exact(x, t, p_real)

    def loss(gp):
        G = gp["m"] + jnp.exp(gp["ls"]) * z
        fake_p = {"mu": sg(gp["m"]), "ls": sg(gp["ls"])}
        fake = lambda x, t, c: v_exact(x, t, fake_p)
        return L.dmd_loss(G, real, fake, None, jax.random.key(1))

    (val, m), g = vg(loss)(gen)
    gen1 = jax.tree.map(lambda a, b: a - 0.05 * b, gen, g)

    def w2(gp):  # squared 2-Wasserstein distance between diagonal Gaussians
        return float(jnp.sum((gp["m"] - p_real["mu"]) ** 2 + (jnp.exp(gp["ls"]) - jnp.exp(p_real["ls"])) ** 2))

    assert w2(gen1) < w2(gen)
    assert bool(jnp.all(jnp.abs(gen1["m"] - p_real["mu"]) < jnp.abs(gen["m"] - p_real["mu"])))
    assert float(m["dmd_grad_norm"]) > 0 and float(m["nan_frac"]) == 0


def test_dmd_formula_and_nan_masking():
    G = randn(0, (3, 2, 4))
    eps = randn(1, G.shape)
    t = jnp.array([0.2, 0.5, 0.9])
    real = lambda x, t, c: 0.5 * x
    fake = lambda x, t, c: (0.5 * x).at[1].set(jnp.nan)  # sample 1 broken
    (val, m), g = vg(lambda G_: L.dmd_loss(G_, real, fake, None, jax.random.key(2), t=t, noise=eps))(G)
    assert float(m["nan_frac"]) == pytest.approx(1 / 3) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[1], 0.0)
    fake2 = lambda x, t, c: 0.3 * x
    (val, m), g = vg(lambda G_: L.dmd_loss(G_, real, fake2, None, jax.random.key(2), t=t, noise=eps))(G)
    G, eps, t = (np.asarray(a) for a in (G, eps, t))  # expected value, in numpy
    tb = t[:, None, None]
    x = (1 - tb) * G + tb * eps
    x0r, x0f = x - tb * 0.5 * x, x - tb * 0.3 * x
    norm = np.maximum(np.mean(np.abs(G - x0r), axis=(1, 2), keepdims=True), 1e-5)
    grad = (x0f - x0r) / norm
    np.testing.assert_allclose(val, jnp.mean(jnp.sum(grad**2, axis=(1, 2))), rtol=1e-5)
    np.testing.assert_allclose(g, 2 * grad / 3, rtol=1e-5, atol=1e-7)  # dL/dG = 2 grad / B


def test_critic_loss_detaches_generator_and_fits_fake_score(x64):
    p_gen = {"mu": jnp.array([1.0, -0.5, 0.0]), "ls": jnp.log(jnp.array([0.5, 1.0, 2.0]))}
    G = p_gen["mu"] + jnp.exp(p_gen["ls"]) * randn(0, (1024, 3))
    crit = {"mu": jnp.zeros(3), "ls": jnp.zeros(3)}

    def loss(cp, G_):
        return L.critic_loss(lambda x, t, c: v_exact(x, t, cp), G_, None, jax.random.key(1))

    (val, m), (gc, gG) = jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(crit, G)
    assert float(jnp.max(jnp.abs(gG))) == 0.0  # no gradient into the generator
    assert float(m["critic_loss"]) == pytest.approx(float(val))
    c1 = jax.tree.map(lambda a, b: a - 0.1 * b, crit, gc)
    assert float(jnp.sum((c1["mu"] - p_gen["mu"]) ** 2)) < float(jnp.sum((crit["mu"] - p_gen["mu"]) ** 2))


# ---------------------------------------------------------------- ODE regression


def test_ode_regression_exact_student_and_blocks(x64):
    p = true_params()
    noise = randn(0, (8, 6, 3))
    ts = jnp.asarray(D.few_step_times(4, sigma_max=80.0)[:-1])  # [K] = 4 points
    B = noise.shape[0]
    traj, x_target = jit(
        lambda: (
            jnp.stack([flow_map(noise, jnp.full((B,), ts[0]), jnp.full((B,), tk), p) for tk in ts], axis=1),
            flow_map(noise, jnp.full((B,), ts[0]), jnp.zeros(B), p),
        )
    )()
    loss, _ = jit(lambda: L.ode_regression_loss(student(p), traj, ts, x_target, None, jax.random.key(1)))()
    assert float(loss) < 1e-20
    loss_b, m = jit(
        lambda: L.ode_regression_loss(student(p), traj, ts, x_target, None, jax.random.key(1), sizes=(2, 2, 2))
    )()
    assert float(loss_b) < 1e-20
    idx = jnp.tile(jnp.array([[0, 3, 1]]), (B, 1))
    loss_p, m = jit(
        lambda: L.ode_regression_loss(
            student(perturbed_params()), traj, ts, x_target, None, jax.random.key(1), sizes=(2, 2, 2), index=idx
        )
    )()
    assert float(loss_p) > 1e-3
    np.testing.assert_allclose(m["t_mean"], np.mean(np.asarray(ts)[[0, 0, 3, 3, 1, 1]]), rtol=1e-12)


# ---------------------------------------------------------------- teacher flow matching (TF / DF)


def test_bell_weight():
    np.testing.assert_allclose(L.bell_weight(jnp.array([0.0, 0.5, 1.0])), [0.0, 1 - math.exp(-0.5), 0.0], atol=1e-7)


def test_teacher_forcing_packing_and_formula():
    B, T = 2, 3
    x0 = randn(0, (B, T, 2, 2, 4))  # [B, T, H, W, C]
    eps = randn(1, x0.shape)
    t = jnp.array([0.3, 0.8])

    @jit
    def run():
        seen = {}

        def net(x, tt, c):
            seen["x"], seen["t"] = x, tt  # what the network received
            return jnp.zeros_like(x) + D.expand_time(tt, x)  # predicts v = t everywhere

        loss, _ = L.teacher_forcing_loss(net, x0, None, jax.random.key(2), t=t, noise=eps)
        loss_n, _ = L.teacher_forcing_loss(net, x0, None, jax.random.key(2), t=t, noise=eps, weighting="none")
        return loss, loss_n, seen

    loss, loss_n, seen = run()
    assert seen["x"].shape == (B, 2 * T, 2, 2, 4) and seen["t"].shape == (B, 2 * T)
    np.testing.assert_array_equal(seen["x"][:, :T], x0)  # clean context first ...
    np.testing.assert_array_equal(seen["t"][:, :T], 0.0)  # ... at t = 0
    np.testing.assert_allclose(seen["x"][:, T:], D.rf_noise(x0, eps, t), rtol=1e-6)
    err = D.expand_time(t, x0) - (eps - x0)
    per_frame = jnp.mean(err**2, axis=(2, 3, 4))  # [B, T]
    expect = jnp.mean(jnp.sum(L.bell_weight(t)[:, None] * per_frame, axis=1))
    np.testing.assert_allclose(loss, expect, rtol=1e-5)
    np.testing.assert_allclose(loss_n, jnp.mean(jnp.sum(per_frame, axis=1)), rtol=1e-5)


def test_diffusion_forcing_block_times_and_formula():
    B, T = 3, 7
    x0 = randn(0, (B, T, 4))
    sizes = D.block_sizes(T, 3, 1)
    eps = randn(3, x0.shape)

    def net(x, tt, c):
        return jnp.zeros_like(x) + 0.0 * tt[:, :, None]

    @jit
    def sampled():
        seen = {}

        def spy(x, tt, c):
            seen["t"] = tt
            return net(x, tt, c)

        L.diffusion_forcing_loss(spy, x0, None, jax.random.key(1), sizes)
        return seen["t"]

    tt = np.asarray(sampled())
    assert tt.shape == (B, T)
    assert np.all(tt[:, 1:4] == tt[:, 1:2]) and np.all(tt[:, 4:] == tt[:, 4:5]) and not np.all(tt[:, 0] == tt[:, 1])
    loss, _ = jit(
        lambda: L.diffusion_forcing_loss(net, x0, None, jax.random.key(1), sizes, t=jnp.asarray(tt), noise=eps)
    )()
    np.testing.assert_allclose(loss, jnp.mean(jnp.sum(jnp.mean((eps - x0) ** 2, axis=2), axis=1)), rtol=1e-5)


def test_flow_matching_exact_velocity_is_the_minimiser(x64):
    """E||v - (eps - x0)||^2 is minimised by the exact marginal velocity: its parameter gradient ~ 0."""
    x0 = data(B=4096, T=1)
    p_true = true_params()
    f = vg(lambda p: L.flow_matching_loss(lambda x, t, c: v_exact(x, t, p), x0, None, jax.random.key(1)))
    _, g = f(p_true)
    _, g_bad = f(perturbed_params())
    assert max_abs(g) < 0.1 * max_abs(g_bad)


# ---------------------------------------------------------------- rCM combination


def test_rcm_combination_does_not_rescale(x64):
    x0 = data(B=4)
    fn, jfn = student_pair(perturbed_params())
    G = x0 + 0.1

    @jit
    def both():
        cm = L.scm_rf_loss(fn, jfn, teacher_fn, x0, None, jax.random.key(0))
        dmd = L.dmd_loss(G, teacher_fn, student(perturbed_params()), None, jax.random.key(1))
        return cm, dmd

    cm, dmd = both()
    total, m = L.rcm_loss(cm, dmd, dmd_weight=0.5)
    np.testing.assert_allclose(total, cm[0] + 0.5 * dmd[0])
    np.testing.assert_allclose(cm[0], 100 * cm[1]["loss_unscaled"])  # the 100 lives in the sCM loss
    assert {"cm/g_norm", "cm/nan_frac", "dmd/dmd_grad_norm", "loss"} <= set(m)
    np.testing.assert_allclose(L.rcm_loss(cm, None)[0], cm[0])
    with pytest.raises(ValueError):
        L.rcm_loss(None, None)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_error():
    params, net = make_net(0)
    fn = lambda x, t, c: net(params, x, t, c)
    x0 = jnp.ones((2, 4, 3))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="does not match"):  # t vs x
        L.scm_rf_loss(fn, fn, teacher_fn, x0, None, k, t=jnp.full((3,), 0.5))
    with pytest.raises(ValueError, match="does not match"):
        L.teacher_forcing_loss(fn, x0, None, k, t=jnp.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="leading"):  # cond vs x
        L.scm_trigflow_loss(fn, fn, teacher_fn, x0, {"text": jnp.ones((3, 8))}, k)
    with pytest.raises(ValueError, match="leading"):
        L.dmd_loss(x0, fn, fn, None, k, uncond={"text": jnp.ones((5, 8))}, guidance=3.0)
    with pytest.raises(ValueError, match="must lie in"):  # t outside [0, 1]
        L.flow_matching_loss(fn, x0, None, k, t=jnp.array([0.5, 1.2]))
    with pytest.raises(ValueError, match="must lie in"):
        L.critic_loss(fn, x0, None, k, t=jnp.array([-0.1, 0.2]))
    with pytest.raises(ValueError, match="noise"):
        L.dmd_loss(x0, fn, fn, None, k, t=jnp.full((2,), 0.5), noise=jnp.ones((2, 4, 2)))
    with pytest.raises(ValueError, match="frame axis"):
        L.scm_rf_loss(fn, fn, teacher_fn, jnp.ones((2,)), None, k)
    with pytest.raises(ValueError, match="returned shape"):
        L.critic_loss(lambda x, t, c: x[..., :1], x0, None, k, t=jnp.full((2,), 0.5), noise=x0)
    with pytest.raises(ValueError, match="uncond"):
        L.dcm_loss(fn, teacher_fn, x0, None, k, guidance=5.0)
    with pytest.raises(ValueError, match="t0 > t1"):
        L.dcm_loss(fn, teacher_fn, x0, None, k, t0=jnp.array([0.5, 0.5]), t1=jnp.array([0.6, 0.1]))
    with pytest.raises(ValueError, match="r <= t"):
        u = lambda z, r, t, c: z
        L.meanflow_loss(u, u, x0, None, k, r=jnp.array([0.5, 0.5]), t=jnp.array([0.4, 0.6]))
    with pytest.raises(ValueError, match="sum to"):
        L.diffusion_forcing_loss(fn, x0, None, k, (1, 2))
    with pytest.raises(ValueError, match="x_traj"):
        L.ode_regression_loss(fn, jnp.ones((2, 3, 4, 2)), jnp.ones(3) * 0.5, x0, None, k)
    with pytest.raises(ValueError, match="weighting"):
        L.teacher_forcing_loss(fn, x0, None, k, weighting="gauss")


# ---------------------------------------------------------------- docs example


def test_docs_example_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/losses.md must contain a python example"
    code = blocks[0]
    assert len([ln for ln in code.strip().splitlines() if ln.strip()]) <= 12
    ns = {}
    exec(compile(code, "docs/losses.md", "exec"), ns)
    assert np.isfinite(float(ns["loss"]))
