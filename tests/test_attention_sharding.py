"""`ops.attention_sharded`: the kernels (interpret mode) under `jax.shard_map` on 4 CPU devices.

Runs in a subprocess so that `--xla_force_host_platform_device_count=4` is set
before jax initialises (the main pytest process has already imported jax).
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pallas_kernels import masks, ops
    from pallas_kernels.reference import attention_reference
    from pallas_kernels.triton import FlashConfig
    assert len(jax.devices()) == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    spec = masks.block_causal(3, 7, 1)
    rng = np.random.default_rng()
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
    print("SHARDED_OK")
""")


def test_attention_sharded_on_4_cpu_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=root)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "SHARDED_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
