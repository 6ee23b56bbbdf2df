"""TPU estimates without a TPU: compiled memory of the train steps per chip, and the attention
kernels' FLOPs, bytes and roofline time per generation. Needs libtpu (jax[tpu]), not a TPU.

    python experiments/tpu_estimates.py kernels --out kernels.json
    python experiments/tpu_estimates.py steps --out steps.json [--only v5p-16]

kernels: each Mosaic kernel (forward, JVP, forward + backward) at Wan2.1-1.3B sizes (12 heads,
  D = 128, bf16; 32,760 tokens block-causal / full, 65,520 teacher forcing) compiled for one
  chip of v4, v5e, v5p and v6e; FLOPs and bytes from the kernels' cost estimates as the
  compiler reports them (`cost_analysis()`: visited tiles only), and the roofline time
  max(FLOPs / peak bf16, bytes / HBM bandwidth) from the chips' public specs. Estimates: no
  TPU ran anything.
steps: `crm_jax.training.aot.compile_steps` of the wan configs (480p x 21 frames, batch 8) on
  named slices; memory per chip from `memory_analysis()` (arguments + outputs - aliases +
  temporaries of the largest jit of the step).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from crm_jax.training import aot  # noqa: E402
from pallas_kernels import masks, ops  # noqa: E402
from pallas_kernels.mosaic import default_config  # noqa: E402

GIB = 2**30
GENERATIONS = (("v4", "v4:2x2x1"), ("v5e", "v5e:1x1"), ("v5p", "v5p:2x2x1"), ("v6e", "v6e:1x1"))
# (slice label, topology, mesh data x fsdp x context, configs and their step plans)
SLICES = (
    ("v5p-16", "v5p:2x2x2", (1, 8, 1)),  # v5p names count TensorCores: 8 chips
    ("v6e-8", "v6e:2x4", (1, 8, 1)),
    ("v5e-16", "v5e:4x4", (1, 8, 2)),
    ("v5e-32", "v5e:4x8", (1, 8, 4)),
    ("v6e-16", "v6e:4x4", (1, 8, 2)),
)
STEPS = (
    ("tf_scm", "wan_tf_scm", None, ""),
    ("sf_dmd", "wan_sf_dmd", [("student", 4, True), ("critic", 4, True)], ""),
    ("tf_scm_14b_teacher", "wan_tf_scm", None, "wan_14b"),
)


def kernel_rows():
    n = 21 * 1560
    cases = (
        ("full", masks.full(n)),
        ("block_causal chunk 3", masks.block_causal(21, 1560, 3)),
        ("teacher_forcing frame", masks.teacher_forcing(21, 1560, 1)),
        ("teacher_forcing chunk 3", masks.teacher_forcing(21, 1560, 3)),
    )
    rows = []
    for gen, topo in GENERATIONS:
        dev = aot.tpu_devices(topo)[0]
        chip = aot.chip_of([dev])
        sh = SingleDeviceSharding(dev)
        for name, spec in cases:
            x = jax.ShapeDtypeStruct((1, spec.q_len, 12, 128), jnp.bfloat16)
            fns = {
                "forward": lambda q, k, v, spec=spec: ops.attention(q, k, v, spec),
                "jvp": lambda q, k, v, spec=spec: jax.jvp(
                    lambda *a: ops.attention(*a, spec, ad="jvp"), (q, k, v), (q, k, v)
                ),
                "forward+backward": lambda q, k, v, spec=spec: jax.grad(
                    lambda *a: ops.attention(*a, spec).astype(jnp.float32).sum(), argnums=(0, 1, 2)
                )(q, k, v),
            }
            for mode, fn in fns.items():
                with ops.target_platform("tpu"):
                    c = jax.jit(fn, in_shardings=(sh,) * 3).trace(x, x, x).lower().compile()
                cost = c.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                flops, byts = float(cost["flops"]), float(cost["bytes accessed"])
                t = aot.roofline_seconds(flops, byts, chip)
                rows.append(
                    dict(
                        generation=gen,
                        mask=name,
                        tokens=spec.q_len,
                        mode=mode,
                        tiles=list(default_config(spec.q_len, spec.kv_len).fwd),
                        flops=flops,
                        bytes=byts,
                        roofline_ms=round(t * 1e3, 2),
                        bound="compute"
                        if flops / (chip.bf16_tflops * 1e12) >= byts / (chip.hbm_gbps * 1e9)
                        else "memory",
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def step_rows(only: str | None, steps: str | None):
    rows = []
    for label, topo, (d, f, cp) in SLICES:
        if only and label != only:
            continue
        devices = aot.tpu_devices(topo)
        chip = aot.chip_of(devices)
        for name, module, plans, teacher in STEPS:
            if steps and name not in steps.split(","):
                continue
            c = importlib.import_module(f"configs.{module}").get_config()
            c.mesh.update(data=d, fsdp=f, context=cp)
            if teacher:
                c.teacher_model.name = teacher
            t0 = time.time()
            try:
                reps = aot.compile_steps(c, devices, platform="tpu", plans=plans)
            except Exception as e:  # e.g. out of HBM at compile time: recorded as such
                msg = str(e).strip().splitlines()
                rows.append(dict(slice=label, step=name, error=(msg[0] if msg else type(e).__name__)[:300]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            for r in reps:
                rows.append(
                    dict(
                        slice=label,
                        topology=topo,
                        chips=len(devices),
                        mesh=[d, f, cp],
                        step=f"{name}: {r.name}",
                        total_gib=round(r.total / GIB, 2),
                        temp_gib=round(r.temp / GIB, 2),
                        argument_gib=round(r.argument / GIB, 2),
                        hbm_gib=chip.hbm_gib,
                        fits=r.total <= chip.hbm_gib * GIB,
                        compile_s=round(time.time() - t0),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("kernels", "steps"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, help="steps: one slice label (e.g. v5p-16)")
    ap.add_argument(
        "--steps", default=None, help="steps: a comma-separated subset of " + ", ".join(repr(n) for n, *_ in STEPS)
    )
    a = ap.parse_args(argv)
    rows = kernel_rows() if a.what == "kernels" else step_rows(a.only, a.steps)
    if a.what == "kernels":
        print("| generation | mask | tokens | tiles | mode | TFLOP | GB moved | roofline ms | bound |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['generation']} | {r['mask']} | {r['tokens']} | {r['tiles'][0]}x{r['tiles'][1]} | {r['mode']} | "
                f"{r['flops'] / 1e12:.1f} | {r['bytes'] / 1e9:.2f} | {r['roofline_ms']} | {r['bound']} |"
            )
    else:
        print("| slice | mesh (data x fsdp x context) | step | per chip GiB (temporaries) | HBM GiB | fits |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['slice']} | | {r['step']} | does not compile: {r['error']} | | no |")
                continue
            print(
                f"| {r['slice']} | {' x '.join(map(str, r['mesh']))} | {r['step']} | {r['total_gib']} ({r['temp_gib']}) | "
                f"{r['hbm_gib']} | {'yes' if r['fits'] else 'no'} |"
            )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
