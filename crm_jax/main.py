"""Entry point: `python -m crm_jax.main --config=configs/X.py --workdir=DIR [--config.key=value ...]`."""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, samples)")
flags.mark_flags_as_required(["config", "workdir"])

from crm_jax.distributed import ClusterError, is_main_process, log, maybe_init_distributed  # noqa: E402
from crm_jax.training.steps import MODES as TRAIN_MODES  # noqa: E402

MODES = ("forward_check", "demo") + TRAIN_MODES


def forward_check(cfg, workdir: str) -> dict:
    """Build the model, stream a block-causal video through the KV cache, compare with one pass."""
    import jax
    import jax.numpy as jnp

    from crm_jax.models.config import get_model_config
    from crm_jax.models.wan import AttentionPattern, KVCache, functional, init_model

    mcfg = get_model_config(cfg.model)
    model = init_model(mcfg, cfg.seed)
    apply, params = functional(model)
    apply = jax.jit(apply, static_argnames=("pattern", "cache_frames", "ad"))
    h, w = cfg.latent_hw
    k1, k2, k3 = jax.random.split(jax.random.key(cfg.seed), 3)
    x = jax.random.normal(k1, (cfg.batch_size, cfg.num_frames, h, w, mcfg.in_channels))
    t = jax.random.uniform(k2, (cfg.batch_size, cfg.num_frames))
    ctx = jax.random.normal(k3, (cfg.batch_size, mcfg.text_len, mcfg.text_dim))
    pat = AttentionPattern("block_causal", cfg.block_frames, cfg.first_block_frames)
    t0 = time.time()
    full = apply(params, x, t, ctx, pattern=pat).block_until_ready()
    t_full = time.time() - t0
    cache = KVCache.create(mcfg, cfg.batch_size, cfg.num_frames, model.tokens_per_frame(h, w))
    starts = pat.block_starts(cfg.num_frames) + [cfg.num_frames]
    outs = []
    for s, e in zip(starts[:-1], starts[1:]):
        o, cache = apply(params, x[:, s:e], t[:, s:e], ctx, pattern=pat, cache=cache, cache_frames=s)
        outs.append(o)
    err = float(jnp.abs(jnp.concatenate(outs, 1) - full).max())
    n_params = sum(p.size for p in jax.tree.leaves(params))
    return dict(
        mode="forward_check",
        model=cfg.model,
        params=int(n_params),
        output_shape=list(full.shape),
        first_call_s=round(t_full, 2),
        streaming_vs_full_max_abs_err=err,
        device=str(jax.devices()[0]),
    )


def run(cfg, workdir: str) -> None:
    """Run the config's mode in `workdir` (what the command line does after parsing)."""
    if cfg.mode not in MODES:
        raise app.UsageError(f"unknown mode {cfg.mode!r}; known: {MODES}")
    if cfg.mode in TRAIN_MODES:
        from crm_jax.inputs import check_inputs, training_inputs

        check_inputs(training_inputs(cfg), f"{cfg.mode} config")  # before the workdir is made
    os.makedirs(workdir, exist_ok=True)  # every process: Orbax writes checkpoints from all of them
    if cfg.mode == "demo":
        from crm_jax.demo import run_demo

        run_demo(cfg, workdir)
        return
    if cfg.mode in TRAIN_MODES:
        from crm_jax.training.loop import train

        out = train(cfg, workdir)
        log(
            f"{cfg.mode}: {out['iteration']} iterations, {out['step']} student steps, "
            f"{out['nan_skips']} skipped, final metrics {out['metrics']}"
        )
        return
    result = forward_check(cfg, workdir)
    if not is_main_process():
        return
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("forward pass of the tiny causal Wan model, streamed block by block vs one pass:")
    for k, v in result.items():
        print(f"  {k:32s} {v}")
    print(f"wrote {os.path.join(workdir, 'result.json')}")


def parse_argv(argv):
    """(config, workdir) from a command line `[prog, --config=FILE[:ARG], --workdir=DIR,
    --config.key=value, ...]`, parsed with private flags (so it can run in-process, repeatedly)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    fv(list(argv))
    if fv["config"].value is None or not fv["workdir"].value:
        raise app.UsageError("--config and --workdir are required")
    return fv["config"].value, fv["workdir"].value


def cli(argv) -> None:
    """In-process entry: `cli(["crm_jax.main", "--config=...", "--workdir=...", ...])`."""
    maybe_init_distributed()
    run(*parse_argv(argv))


def main(argv):
    del argv
    from crm_jax.inputs import MissingInputError

    try:
        maybe_init_distributed()
        run(_CONFIG.value, _WORKDIR.value)
    except (MissingInputError, ClusterError) as e:  # a clear message, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
