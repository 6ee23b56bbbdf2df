"""`ops.attention_sharded`: the kernels (interpret mode) under `jax.shard_map` on 4 CPU devices:
batch x head parallel, and context parallel (Ulysses, and query-split cross-attention).

Runs in a subprocess so that `--xla_force_host_platform_device_count=4` is set
before jax initialises (the main pytest process has already imported jax).
"""

import os
import subprocess
import sys
import textwrap

from tests.conftest import CPU_COMPILE_FAST

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pallas_kernels import masks, ops
    from pallas_kernels.reference import attention_reference
    from pallas_kernels.triton import FlashConfig
    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = masks.block_causal(3, 7, 1)
    rng = np.random.default_rng(0)
    mk = lambda: jnp.asarray(rng.standard_normal((2, spec.q_len, 4, 64)), jnp.float32)
    q, k, v, tq = mk(), mk(), mk(), mk()
    sh = NamedSharding(mesh, P("data", None, "model", None))
    q, k, v, tq = (jax.device_put(x, sh) for x in (q, k, v, tq))
    cfg = FlashConfig.uniform(16)
    kw = dict(batch_axis="data", head_axis="model", impl="triton", interpret=True, config=cfg)
    ref = lambda q, k, v: attention_reference(q, k, v, spec)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    o = jax.jit(lambda q, k, v: ops.attention_sharded(q, k, v, spec, mesh, **kw))(q, k, v)
    assert o.sharding.spec == P("data", None, "model", None), o.sharding
    assert rel(o, ref(q, k, v)) < 1e-5
    f = lambda q: ops.attention_sharded(q, k, v, spec, mesh, ad="jvp", **kw)
    _, t = jax.jit(lambda q, tq: jax.jvp(f, (q,), (tq,)))(q, tq)
    _, rt = jax.jvp(lambda q: ref(q, k, v), (q,), (tq,))
    assert rel(t, rt) < 1e-4, rel(t, rt)
    g = jax.jit(jax.grad(lambda q: jnp.sum(ops.attention_sharded(q, k, v, spec, mesh, **kw) * v)))(q)
    rg = jax.grad(lambda q: jnp.sum(ref(q, k, v) * v))(q)
    assert rel(g, rg) < 1e-4, rel(g, rg)

    # Context parallelism (Ulysses): tokens split over "model" outside, heads inside.
    cmesh = jax.make_mesh((2, 2), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    T, N = 4, 6
    specs = [masks.block_causal(T, N, 2), masks.teacher_forcing(T // 2, N, 1), masks.full(T * N)]
    mk5 = lambda t: jnp.asarray(rng.standard_normal((2, t, N, 4, 64)), jnp.float32)
    flat = lambda x: x.reshape(2, -1, 4, 64)
    for spec in specs:
        q, k, v, tq, tk = mk5(T), mk5(T), mk5(T), mk5(T), mk5(T)
        kw = dict(batch_axis="data", context_axis="context", impl="triton", interpret=True, config=cfg)
        ref = lambda q, k, v: attention_reference(flat(q), flat(k), flat(v), spec).reshape(q.shape)
        sh5 = NamedSharding(cmesh, P("data", None, "context", None, None))
        q, k, v, tq, tk = (jax.device_put(x, sh5) for x in (q, k, v, tq, tk))
        f = lambda q, k, v: ops.attention_sharded(q, k, v, spec, cmesh, **kw)
        o = jax.jit(f)(q, k, v)
        assert o.sharding.spec == P("data", None, "context", None, None), o.sharding
        assert rel(o, ref(q, k, v)) < 1e-5, (spec.kind, rel(o, ref(q, k, v)))
        fj = lambda q, k: ops.attention_sharded(q, k, v, spec, cmesh, ad="jvp", **kw)
        _, t = jax.jit(lambda q, k, tq, tk: jax.jvp(fj, (q, k), (tq, tk)))(q, k, tq, tk)
        _, rt = jax.jvp(lambda q, k: ref(q, k, v), (q, k), (tq, tk))
        assert rel(t, rt) < 1e-4, (spec.kind, rel(t, rt))
        loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * tq)
        g = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(q, k, v)
        rg = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(g, rg):
            assert rel(a, b) < 1e-4, (spec.kind, rel(a, b))
        # flat [B, L, H, D] layout, XLA backend, under jax.set_mesh (no mesh argument)
        with jax.set_mesh(cmesh):
            o2 = jax.jit(lambda q, k, v: ops.attention_sharded(
                flat(q), flat(k), flat(v), spec, batch_axis="data", context_axis="context", impl="xla"))(q, k, v)
        assert rel(o2.reshape(o.shape), ref(q, k, v)) < 1e-5
    # cross-attention: queries split over "context", text keys replicated, no all-to-all
    q = jax.device_put(mk5(T), NamedSharding(cmesh, P("data", None, "context", None, None)))
    kt, vt = (jnp.asarray(rng.standard_normal((2, 5, 4, 64)), jnp.float32) for _ in range(2))
    spec = masks.full(T * N, 5)
    o = jax.jit(lambda q: ops.attention_sharded(q, kt, vt, spec, cmesh, batch_axis="data",
                context_axis="context", split_kv=False, impl="triton", interpret=True, config=cfg))(q)
    assert rel(o, attention_reference(flat(q), kt, vt, spec).reshape(o.shape)) < 1e-5
    # what context parallelism cannot take is a clear error
    for bad, msg in [(lambda: ops.attention_sharded(mk5(T)[:, :, :5], mk5(T)[:, :, :5], mk5(T)[:, :, :5],
                                                    masks.block_causal(T, 5, 2), cmesh, context_axis="context"),
                      "not divisible"),
                     (lambda: ops.attention_sharded(q, q, q, masks.block_causal(T, N, 2), cmesh,
                                                    context_axis="context", split_kv=False), "full mask"),
                     (lambda: ops.attention_sharded(q, q, q, specs[0], cmesh, context_axis="ctx"), "not in the mesh")]:
        try:
            bad()
        except ValueError as e:
            assert msg in str(e), (msg, str(e))
        else:
            raise AssertionError(f"no error for {msg}")
    print("SHARDED_OK")
""")


def test_attention_sharded_on_4_cpu_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {CPU_COMPILE_FAST}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=root,
    )
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
