"""What fits where: per-GPU memory of the training state for 1.3B students with 1.3B / 14B teachers.

    python experiments/memory_table.py [--activations_gib 38] [--gpu_gib 139] [--out FILE.json]

Parameter counts come from the model definitions (`nnx.eval_shape`, no allocation). The
state follows the training program's policy: the student's parameters, EMA and AdamW
moments in float32 (16 bytes per parameter) plus a float32 gradient during the step
(4), the frozen teacher in bf16 (2), and for SF-DMD a trainable critic of the teacher's
architecture (float32 parameters + moments + gradient, 16 + 4). The DMD teacher is the
teacher (no second copy). FSDP shards all of it over the GPUs (`crm_jax.training.sharding`);
data-parallel replicas hold it whole. Activations per GPU are a measured input
(`--activations_gib`: peak minus state of `bench_train_step.py` on one GPU, one sample,
remat of whole blocks); they do not shrink with FSDP, and context parallelism divides
them by its size (tokens are split). For a 14B critic (SF-DMD) the saved block inputs of its
backward are added (layers x 32,760 tokens x dim x 4 bytes, beyond the 1.3B critic's).
Rows marked "no" exceed `--gpu_gib`. An estimate, not a measurement, except the 1.3B rows
on one GPU, which reproduce the benchmark's peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from crm_jax.models.config import get_model_config  # noqa: E402
from crm_jax.models.wan import WanModel  # noqa: E402

GIB = 2**30


def param_count(name: str) -> int:
    model = nnx.eval_shape(lambda: WanModel(get_model_config(name), rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def state_gib(mode: str, student: int, teacher: int) -> dict:
    parts = {
        "student params+EMA+AdamW (fp32)": 16 * student,
        "student grads (fp32)": 4 * student,
        "teacher (bf16)": 2 * teacher,
    }
    if mode == "sf_dmd":
        parts["critic params+AdamW (fp32)"] = 12 * teacher
        parts["critic grads (fp32)"] = 4 * teacher
    return {k: v / GIB for k, v in parts.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--activations_gib",
        type=float,
        default=None,
        help="measured activation peak per sample on one GPU (default: per mode, see ACT)",
    )
    ap.add_argument("--gpu_gib", type=float, default=139.0, help="usable memory per GPU (H200: ~139)")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    counts = {n: param_count(n) for n in ("wan_1_3b", "wan_14b")}
    # Activation peaks (GiB, one sample, 480p x 21 frames, chunk 3, remat block) from the
    # single-H200 benchmark: peak minus the state it held (docs/benchmarks.md).
    act = {
        "tf_scm": 63.0 - 20 * counts["wan_1_3b"] / GIB - 2 * counts["wan_1_3b"] / GIB,
        "sf_dmd": 125.0 - 20 * counts["wan_1_3b"] / GIB - 18 * counts["wan_1_3b"] / GIB,
    }
    rows = []
    for mode in ("tf_scm", "sf_dmd"):
        for teacher in ("wan_1_3b", "wan_14b"):
            parts = state_gib(mode, counts["wan_1_3b"], counts[teacher])
            state = sum(parts.values())
            activ = a.activations_gib if a.activations_gib is not None else act[mode]
            if mode == "sf_dmd" and teacher != "wan_1_3b":
                # the critic's backward keeps one float32 block input per layer (remat block)
                t_cfg, s_cfg = get_model_config(teacher), get_model_config("wan_1_3b")
                activ += (t_cfg.num_layers * t_cfg.dim - s_cfg.num_layers * s_cfg.dim) * 21 * 1560 * 4 / GIB
            for n in (int(g) for g in a.gpus.split(",")):
                for context in sorted({1, n}):
                    per_gpu = state / (n // context) + activ / context  # FSDP over n / context, CP over context
                    rows.append(
                        dict(
                            mode=mode,
                            teacher=teacher,
                            gpus=n,
                            fsdp=n // context,
                            context=context,
                            state_gib=round(state, 1),
                            activations_gib=round(activ, 1),
                            per_gpu_gib=round(per_gpu, 1),
                            fits=per_gpu <= a.gpu_gib,
                        )
                    )
    print(f"parameters: wan_1_3b {counts['wan_1_3b'] / 1e9:.2f} B, wan_14b {counts['wan_14b'] / 1e9:.2f} B")
    print(
        "| mode | teacher + critic | GPUs | fsdp x context | state GiB (total) | activations GiB | per GPU GiB | fits |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['teacher']} | {r['gpus']} | {r['fsdp']} x {r['context']} | {r['state_gib']} | "
            f"{r['activations_gib']} | {r['per_gpu_gib']} | {'yes' if r['fits'] else 'no'} |"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(params=counts, gpu_gib=a.gpu_gib, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
