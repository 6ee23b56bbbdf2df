"""How well does each toy teacher denoise *real* clips in the layout SF-DMD queries it in? (issue 9)

SF-DMD's real score is a teacher evaluated on a noised clip, every frame at the same time t
(`losses.dmd.dmd_loss`). The bidirectional teacher was trained exactly so (full attention). A
teacher-forcing teacher (teacher_c2) was trained on `[clean context | noisy chunk]` instead; as
the DMD real score (`train.dmd_teacher_pattern="block_causal"`, the `dmd_*_causal` jobs) each
chunk then sees *noised* earlier chunks, an input it never saw. This script measures, on held-out
simulator clips (the data distribution DMD should pull towards), the guided x0-prediction error
per chunk for:

  bi / full               teacher_bi, every frame noised, full attention (its training layout)
  c2 / block_causal       teacher_c2, every frame noised, block-causal (DMD's real-score layout)
  c2 / teacher_forcing    teacher_c2, clean real context + the noised chunk (its training layout)

Chunk 0 has no context, so the two teacher_c2 rows must agree there (a check of the script).

    python experiments/dmd_real_score_check.py --workdir runs/toy_study_v4 --out experiments/results/dmd_real_score.json

CPU: about 20 s (64 episodes, 3 times, 2 noise draws).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def chunk_errors(x0_hat, x0, block: int):
    """Mean squared x0 error per chunk of `block` frames: `[B, T, ...]` -> list of T // block floats."""
    import jax.numpy as jnp

    err = jnp.mean(jnp.square(x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)), axis=(0, 2, 3, 4))
    return [float(jnp.mean(err[i : i + block])) for i in range(0, x0.shape[1], block)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/toy_study_v4", help="a toy-study workdir with both teachers' exports")
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--times", default="0.2,0.5,0.8", help="RF times t (x_t = (1 - t) x0 + t eps)")
    ap.add_argument("--draws", type=int, default=2, help="noise draws per time")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from crm_jax import diffusion as D
    from crm_jax.evaluation import world_model as wm
    from crm_jax.models import adapter, convert
    from crm_jax.models.wan import functional
    from crm_jax.training import run_setup
    from experiments import toy_study as ts

    study = ts.Study(os.path.abspath(a.workdir), "full")
    for job in ("teacher_bi", "teacher_c2"):
        if not os.path.isdir(study.export(job)):
            raise FileNotFoundError(f"{study.export(job)} is missing: run the toy study's teachers first")
    base = study.base("teacher_tf", 2)
    tcfg, mcfg = run_setup.train_config(base), run_setup.model_config(base)
    src, batch = wm.heldout_source(study.world, mcfg.text_len, mcfg.text_dim, a.episodes)
    x0 = batch["latents"]
    cond = dict(context=batch["context"], actions=batch["actions"], tf_context=x0)
    uncond = adapter.uncond_like(cond, src.negative_context())

    nets_by_row = {}
    for job, rows in (
        ("teacher_bi", (("bi / full", "full", adapter.velocity_fn),)),
        (
            "teacher_c2",
            (
                ("c2 / block_causal", "block_causal", adapter.velocity_fn),
                ("c2 / teacher_forcing", "teacher_forcing", adapter.tf_velocity_fn),
            ),
        ),
    ):
        apply, params = functional(convert.load_nnx(study.export(job)))
        for name, kind, make in rows:  # guided velocity of each row, jitted once
            fn = make(apply, params, tcfg.pattern(kind))
            nets_by_row[name] = jax.jit(lambda x, tb, fn=fn: D.guided_velocity(fn, x, tb, cond, uncond, ts.GUIDANCE))

    times = [float(t) for t in a.times.split(",")]
    table = {name: {} for name in nets_by_row}
    key = jax.random.key(0)
    for t in times:
        tb = jnp.full((x0.shape[0],), t, jnp.float32)
        sums = {name: None for name in nets_by_row}
        for d in range(a.draws):
            eps = jax.random.normal(jax.random.fold_in(key, d), x0.shape, jnp.float32)
            x = D.rf_noise(x0, eps, tb)
            for name, guided in nets_by_row.items():
                v = guided(x, tb)
                e = chunk_errors(D.x0_from_v(x, tb, v), x0, tcfg.block_frames)
                sums[name] = e if sums[name] is None else [s + v for s, v in zip(sums[name], e)]
        for name in nets_by_row:
            table[name][t] = [s / a.draws for s in sums[name]]

    print(
        f"guided (CFG {ts.GUIDANCE}) x0 mean squared error on {a.episodes} held-out simulator clips, "
        f"per chunk of {tcfg.block_frames} frames"
    )
    n_chunks = len(next(iter(table.values()))[times[0]])
    print(f"{'teacher / layout':24s} {'t':>4s} " + " ".join(f"{'chunk ' + str(i):>9s}" for i in range(n_chunks)))
    for name, by_t in table.items():
        for t, errs in by_t.items():
            print(f"{name:24s} {t:4.1f} " + " ".join(f"{e:9.4f}" for e in errs))
    c2 = table["c2 / block_causal"], table["c2 / teacher_forcing"]
    gap0 = max(abs(c2[0][t][0] - c2[1][t][0]) / max(c2[1][t][0], 1e-12) for t in times)
    print(f"check: chunk 0 (no context) agrees between the two teacher_c2 layouts to {gap0:.1e} (relative)")
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(
                dict(
                    episodes=a.episodes,
                    guidance=ts.GUIDANCE,
                    block_frames=tcfg.block_frames,
                    chunk0_relative_gap=gap0,
                    mse={n: {str(t): e for t, e in bt.items()} for n, bt in table.items()},
                ),
                f,
                indent=1,
            )
        print(f"wrote {a.out}")
    return 0 if gap0 < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
