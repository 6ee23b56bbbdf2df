"""Compile kernels, model passes and train steps for real TPU chips, from a CPU host.

Run by tests/test_tpu_compile.py in a subprocess of its own (libtpu allows one process at a
time): `python tests/tpu_compile_worker.py GROUP OUT.json`. Each case is lowered and compiled
(`jax.jit(...).trace(...).lower().compile()`) for compile-only devices of a named topology
(`crm_jax.training.aot.tpu_devices`); Mosaic's layout and memory passes run only in this
compile, so lowering alone would not prove anything. Results: one JSON row per case
({"case", "ok", "error", "seconds", ...}); a case that fails does not stop the others.

Groups:
  kernels  every attention kernel (forward, JVP, gradient) for every mask the model uses, at
           Wan2.1-1.3B sizes (12 heads, D = 128, 32,760 / 65,520 tokens), on v5e and v5p, the
           teacher-forcing masks also on v4 and v6e; cross-attention, the KV-cache prefix call,
           the 14B teacher's 40 heads and twice the 1.3B teacher-forcing sequence.
  model    the wan_1_3b forward, JVP and gradient with abstract parameters (one v5p chip).
  steps    every training mode's step functions at wan_1_3b size on a v5p 2x2x2 slice with a
           data x fsdp x context = 2 x 2 x 2 mesh, and TF-sCM with a 14B teacher.
Sizes of the model and step groups: `--latents T,H,W,C` (default: 480p x 21 frames); `--modes a,b`
limits the steps group to those modes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from crm_jax.training import aot  # noqa: E402
from pallas_kernels import masks, ops  # noqa: E402

FRAMES, TOKENS = 21, 1560  # 480p: 21 latent frames of 30 x 52 tokens


def _case(rows, name, fn, **info):
    t0 = time.time()
    try:
        extra = fn() or {}
        rows.append(dict(case=name, ok=True, error="", seconds=round(time.time() - t0, 1), **info, **extra))
    except Exception as e:  # recorded, not raised: the test names every failing case
        msg = str(e).strip().splitlines()
        rows.append(
            dict(
                case=name,
                ok=False,
                error=(msg[0] if msg else type(e).__name__)[:400],
                trace=traceback.format_exc()[-2000:],
                seconds=round(time.time() - t0, 1),
                **info,
            )
        )
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)


def _compile_attention(dev, spec, heads, ad, prefix_len=None):
    sh = SingleDeviceSharding(dev)
    q = jax.ShapeDtypeStruct((1, spec.q_len, heads, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, spec.kv_len, heads, 128), jnp.bfloat16)

    def attn(q, k, v, mode):
        if prefix_len is not None:
            return ops.attention_kv_prefix(q, k, v, prefix_len, ad=mode)
        return ops.attention(q, k, v, spec, ad=mode)

    def f(q, k, v):
        if ad == "forward":
            return attn(q, k, v, "vjp")
        if ad == "jvp":
            return jax.jvp(lambda *a: attn(*a, "jvp"), (q, k, v), (q, k, v))
        return jax.grad(lambda *a: attn(*a, "vjp").astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    with ops.target_platform("tpu"):
        compiled = jax.jit(f, in_shardings=(sh, sh, sh)).trace(q, k, k).lower().compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    return dict(
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        temp_bytes=int(mem.temp_size_in_bytes),
    )


def kernels(rows):
    n = FRAMES * TOKENS
    specs = {
        "full": masks.full(n),
        "block_causal_frame": masks.block_causal(FRAMES, TOKENS, 1),
        "block_causal_chunk3": masks.block_causal(FRAMES, TOKENS, 3),
        "teacher_forcing_frame": masks.teacher_forcing(FRAMES, TOKENS, 1),
        "teacher_forcing_chunk3": masks.teacher_forcing(FRAMES, TOKENS, 3),
        "teacher_forcing_chunk3_window": masks.teacher_forcing(FRAMES, TOKENS, 3, local_attn_blocks=3, sink_blocks=1),
        "cross_text512": masks.full(n, 512),
    }
    tf = [k for k in specs if k.startswith("teacher_forcing")]
    plan = [("v5e:1x1", list(specs)), ("v5p:2x2x1", list(specs)), ("v4:2x2x1", tf), ("v6e:1x1", tf)]
    for topo, names in plan:
        dev = aot.tpu_devices(topo)[0]
        for name in names:
            for ad in ("forward", "jvp", "grad"):
                _case(
                    rows,
                    f"{topo}/{name}/{ad}",
                    lambda: _compile_attention(dev, specs[name], 12, ad),
                    group="kernels",
                    topology=topo,
                    mask=name,
                    ad=ad,
                    tokens=specs[name].q_len,
                    heads=12,
                )
    dev = aot.tpu_devices("v5p:2x2x1")[0]
    big = masks.teacher_forcing(2 * FRAMES, TOKENS, 3)  # 131,040 tokens: twice the 1.3B sequence
    for name, spec, heads in (
        ("teacher_forcing_chunk3_14b_heads", specs["teacher_forcing_chunk3"], 40),
        ("teacher_forcing_chunk3_2x_tokens", big, 12),
    ):
        for ad in ("forward", "jvp", "grad"):
            _case(
                rows,
                f"v5p:2x2x1/{name}/{ad}",
                lambda: _compile_attention(dev, spec, heads, ad),
                group="kernels",
                topology="v5p:2x2x1",
                mask=name,
                ad=ad,
                tokens=spec.q_len,
                heads=heads,
            )
    # A streaming chunk (3 frames) over a cache buffer of 21 frames holding 9 valid ones.
    chunk = masks.full(3 * TOKENS, n)
    for ad in ("forward", "jvp", "grad"):
        _case(
            rows,
            f"v5p:2x2x1/kv_prefix/{ad}",
            lambda: _compile_attention(dev, chunk, 12, ad, prefix_len=9 * TOKENS),
            group="kernels",
            topology="v5p:2x2x1",
            mask="kv_prefix",
            ad=ad,
            tokens=chunk.q_len,
            heads=12,
        )


def model(rows, latents):
    from crm_jax.models.config import get_model_config
    from crm_jax.models.wan import AttentionPattern, apply_for

    cfg = get_model_config("wan_1_3b", dtype="bfloat16", remat="block")
    apply = apply_for(cfg)
    dev = aot.tpu_devices("v5p:2x2x1")[0]
    sh = SingleDeviceSharding(dev)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), aot.abstract_params(cfg))
    T = latents[0]
    x = jax.ShapeDtypeStruct((1, T, *latents[1:]), jnp.float32, sharding=sh)
    x2 = jax.ShapeDtypeStruct((1, 2 * T, *latents[1:]), jnp.float32, sharding=sh)
    t = jax.ShapeDtypeStruct((1, T), jnp.float32, sharding=sh)
    t2 = jax.ShapeDtypeStruct((1, 2 * T), jnp.float32, sharding=sh)
    ctx = jax.ShapeDtypeStruct((1, cfg.text_len, cfg.text_dim), jnp.float32, sharding=sh)
    bc = AttentionPattern("block_causal", 3)
    tf = AttentionPattern("teacher_forcing", 3)

    def forward(p, x, t, c):
        return apply(p, x, t, c, pattern=bc)

    def jvp(p, x, t, c):  # the sCM tangent pass: d/dt of the teacher-forcing forward
        return jax.jvp(lambda x, t: apply(p, x, t, c, pattern=tf, ad="jvp"), (x, t), (x, jnp.ones_like(t)))

    def grad(p, x, t, c):
        return jax.grad(lambda p: apply(p, x, t, c, pattern=tf).astype(jnp.float32).mean())(p)

    for name, fn, xs, ts in (
        ("forward_block_causal", forward, x, t),
        ("jvp_teacher_forcing", jvp, x2, t2),
        ("grad_teacher_forcing", grad, x2, t2),
    ):

        def run(fn=fn, xs=xs, ts=ts):
            with ops.target_platform("tpu"):
                compiled = jax.jit(fn).trace(params, xs, ts, ctx).lower().compile()
            m = compiled.memory_analysis()
            return dict(
                total_bytes=int(
                    m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
                )
            )

        _case(rows, f"v5p/wan_1_3b/{name}", run, group="model", latents=list(latents))


def steps(rows, latents, only=None):
    import importlib

    modes = [
        ("teacher_tf", "wan_teacher_tf", None),
        ("tf_scm", "wan_tf_scm", None),
        ("tf_meanflow", "wan_tf_meanflow", None),
        ("tf_dcm", "wan_tf_dcm", None),
        ("ode_init", "wan_ode_init", None),
        ("sf_dmd", "wan_sf_dmd", [("student", 4, True), ("critic", 4, True)]),
        ("rcm", "wan_rcm", [("student", 4, True)]),  # its critic step is SF-DMD's
        ("tf_scm_14b_teacher", "wan_tf_scm", None),
    ]
    modes = [m for m in modes if only is None or m[0] in only]
    if not modes:
        return
    devices = aot.tpu_devices("v5p:2x2x2")
    for name, module, plans in modes:
        c = importlib.import_module(f"configs.{module}").get_config()
        c.data.latent_shape = tuple(latents)
        c.mesh.update(data=2, fsdp=2, context=2)
        if name.endswith("14b_teacher"):
            c.teacher_model.name = "wan_14b"

        def run(c=c, plans=plans):
            reps = aot.compile_steps(c, devices, platform="tpu", plans=plans)
            return dict(
                steps=[dict(step=r.name, total_bytes=r.total, flops=r.flops, seconds=round(r.seconds, 1)) for r in reps]
            )

        _case(rows, f"v5p:2x2x2/{name}", run, group="steps", latents=list(latents))


def main(argv):
    group, out = argv[0], argv[1]
    latents = (FRAMES, 60, 104, 16)
    if "--latents" in argv:
        latents = tuple(int(x) for x in argv[argv.index("--latents") + 1].split(","))
    only = None
    if "--modes" in argv:
        only = set(argv[argv.index("--modes") + 1].split(","))
    rows = []
    {
        "kernels": lambda: kernels(rows),
        "model": lambda: model(rows, latents),
        "steps": lambda: steps(rows, latents, only),
    }[group]()
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
