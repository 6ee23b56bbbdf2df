"""Compile a training config's steps for a TPU slice (or the local devices) without running them.

    python -m crm_jax.tools.aot --config=configs/wan_tf_scm.py --topology=v5p:2x2x2 \
        --config.mesh.data=1 --config.mesh.fsdp=8 --config.data.latent_shape=21,60,104,16
    python -m crm_jax.tools.aot --config=configs/wan_tf_scm.py --topology=local   # this host's GPUs

Per step function of the run (student; and for SF-DMD / rCM, student and critic per self-forcing
step count) it prints whether it compiled, the compiled memory per chip (arguments, outputs,
temporaries; `memory_analysis()`), the FLOPs per chip as XLA's `cost_analysis()` counts them (a
loop body once: a lower bound for the scanned layers) and whether it fits the chip's HBM. Compiling for TPU needs libtpu (`pip install "jax[tpu]==0.11.2"`), not a TPU.
Exit status: 0 when every step compiled and fits, 1 when one does not fit or fails to compile,
2 for a bad topology, mesh or config.
"""

from __future__ import annotations

import os
import sys

if "--topology=local" not in sys.argv and not any(a == "local" for a in sys.argv):
    # Compile-only TPU devices live beside a CPU backend: no TPU runtime, no metadata server.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections training config file")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice, e.g. v5e:2x2, v5p:2x2x2, v4:2x2x1, v6e:2x4; or 'local' for this host's devices"
)
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib",
    None,
    "HBM per chip to check against (default: the chip's spec; for 'local', the device's reported memory)",
)
_JSON = flags.DEFINE_string("json", None, "also write the table as JSON to this file")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30


def _local_hbm_gib(dev) -> float | None:
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # CPU devices report none
        return None
    limit = stats.get("bytes_limit")
    return None if not limit else limit / GIB


def run(c, topology: str, hbm_gib: float | None = None, out=print) -> list[dict]:
    """Compile `c`'s steps for `topology`; print a table through `out`; return its rows."""
    import jax

    from crm_jax.training import aot

    if topology == "local":
        devices, platform = jax.devices(), jax.default_backend()
        chip = None
        hbm = hbm_gib if hbm_gib is not None else _local_hbm_gib(devices[0])
    else:
        devices, platform = aot.tpu_devices(topology), "tpu"
        chip = aot.chip_of(devices)
        hbm = hbm_gib if hbm_gib is not None else (chip.hbm_gib if chip else None)
    n = int(c.mesh.data) * int(c.mesh.fsdp) * int(c.mesh.get("context", 1))
    if topology == "local" and n <= len(devices):
        devices = devices[:n]  # as the training program does
    if n != len(devices):
        raise aot.TopologyError(
            f"mesh data={c.mesh.data} x fsdp={c.mesh.fsdp} x context={c.mesh.get('context', 1)} = {n} devices, "
            f"but {topology} has {len(devices)} {'devices' if topology == 'local' else 'chips'}: set --config.mesh.* "
            f"so that the product is {len(devices)}"
        )
    kind = devices[0].device_kind
    out(
        f"{c.mode}: {kind} x {len(devices)} ({topology}), mesh data={c.mesh.data} fsdp={c.mesh.fsdp} "
        f"context={c.mesh.get('context', 1)}, batch {c.data.batch_size}, latents {aot.latent_shape_of(c)}"
        + (f", HBM {hbm:.0f} GiB per chip" if hbm else "")
    )
    out("| step | compiled | arguments GiB | outputs GiB | temporaries GiB | total GiB | TFLOP* | fits | compile s |")
    out("|---|---|---|---|---|---|---|---|---|")
    rows = []

    def row(r):
        fits = r.fits(hbm)
        rows.append(
            dict(
                step=r.name,
                device_kind=kind,
                chips=len(devices),
                argument=r.argument,
                output=r.output,
                temp=r.temp,
                alias=r.alias,
                total=r.total,
                host=r.host,
                flops=r.flops,
                fits=fits,
                compile_s=round(r.seconds, 1),
            )
        )
        out(
            f"| {r.name} | yes | {r.argument / GIB:.2f} | {r.output / GIB:.2f} | {r.temp / GIB:.2f} | "
            f"{r.total / GIB:.2f} | {r.flops / 1e12:.1f} | {'-' if fits is None else 'yes' if fits else 'NO'} | "
            f"{r.seconds:.0f} |"
        )

    aot.compile_steps(c, devices, platform=platform, on_step=row)
    out(
        "* per chip, XLA's cost_analysis(): a loop body counts once (the layer scan as one layer), "
        "so this is a lower bound on the step's FLOPs"
    )
    return rows


def main(argv):
    del argv
    import json

    from crm_jax.training.aot import TopologyError

    logging.set_verbosity(logging.WARNING)
    try:
        rows = run(_CONFIG.value, _TOPOLOGY.value, _HBM_GIB.value)
    except (TopologyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a step that XLA or Mosaic cannot compile
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: compilation failed: {first}", file=sys.stderr)
        return 1
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r["step"] for r in rows if r["fits"] is False]
    if bad:
        print(f"does not fit in HBM: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def cli():
    from crm_jax.errors import UsageError, config_file_arg, load_config_file

    spec = config_file_arg(sys.argv)
    if spec is not None:
        try:
            load_config_file(spec)  # a missing or broken config file: one line, before anything compiles
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    cli()
