"""Entry point: `python -m crm_jax.main --config=configs/X.py --workdir=DIR [--config.key=value ...]`
(installed as `crm-train`). `--verbose` shows the libraries' INFO logs, `--debug` tracebacks."""

from __future__ import annotations

import json
import os
import time

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (checkpoints, metrics, samples)")
flags.mark_flags_as_required(["config", "workdir"])

from crm_jax.distributed import is_main_process, log, maybe_init_distributed  # noqa: E402
from crm_jax.errors import UsageError, config_file_arg, load_config_file, nearest, run_command  # noqa: E402
from crm_jax.training.modes import MODES as TRAIN_MODES  # noqa: E402

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


def _run_training(cfg, workdir: str) -> int | None:
    from crm_jax.pipeline import train

    out = train(cfg, workdir)
    log(summary_line(cfg.mode, out, workdir))
    return None if out["stopped_by"] is None else 128 + int(out["stopped_by"])


def summary_line(mode: str, out: dict, workdir: str) -> str:
    """The last line of a training run: what ran, the final metrics rounded, where the outputs are."""
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in sorted(out["metrics"].items()) if isinstance(v, float))
    where = [f"export {os.path.join(workdir, 'export')}", f"metrics {os.path.join(workdir, 'metrics.jsonl')}"]
    if os.path.isdir(os.path.join(workdir, "samples")):
        where.append(f"samples {os.path.join(workdir, 'samples')}")
    stopped = "" if out["stopped_by"] is None else " (stopped by a signal; rerun to resume)"
    return (
        f"{mode}: {out['iteration']} iterations ({out['step']} student steps, {out['nan_skips']} skipped) "
        f"in {out.get('seconds', 0):.0f} s{stopped}; {metrics or 'no new metrics'}; {', '.join(where)}"
    )


def _run_demo(cfg, workdir: str) -> int | None:
    from crm_jax.demo import Stopped, run_demo

    try:
        run_demo(cfg, workdir)
    except Stopped as e:
        log(str(e))
        return 128 + e.signum
    return None


def _run_forward_check(cfg, workdir: str) -> None:
    result = forward_check(cfg, workdir)
    if not is_main_process():
        return
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("forward pass of the tiny causal Wan model, streamed block by block vs one pass:")
    for k, v in result.items():
        print(f"  {k:32s} {v}")
    print(f"wrote {os.path.join(workdir, 'result.json')}")


# What each `cfg.mode` runs: the training modes of `crm_jax.training.modes`, the demo, the check.
PROGRAMS = {"forward_check": _run_forward_check, "demo": _run_demo, **dict.fromkeys(TRAIN_MODES, _run_training)}


def run(cfg, workdir: str) -> int | None:
    """Run the config's mode in `workdir` (what the command line does after parsing). Returns the
    exit code: None, or 128 + the signal that stopped training (after its checkpoint and export)."""
    if cfg.mode not in PROGRAMS:
        raise UsageError(f"--config: unknown mode {cfg.mode!r}{nearest(cfg.mode, MODES)} (known: {', '.join(MODES)})")
    from crm_jax.inputs import check_output
    from crm_jax.training.validate import check_run_config

    check_run_config(cfg)
    check_output("--workdir", workdir, is_dir=True)
    if cfg.mode in TRAIN_MODES:
        from crm_jax.inputs import check_inputs, training_inputs

        check_inputs(training_inputs(cfg), f"{cfg.mode} config")  # before the workdir is made
    os.makedirs(workdir, exist_ok=True)  # every process: Orbax writes checkpoints from all of them
    from crm_jax.training.workdir_lock import workdir_lock

    with workdir_lock(workdir):
        return PROGRAMS[cfg.mode](cfg, workdir)


def parse_argv(argv):
    """(config, workdir) from a command line `[prog, --config=FILE[:ARG], --workdir=DIR,
    --config.key=value, ...]`, parsed with private flags (so it can run in-process, repeatedly)."""
    spec = config_file_arg(argv)
    if spec is not None:
        load_config_file(spec)  # one UsageError naming the file
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "ml_collections config file", flag_values=fv, lock_config=True)
    flags.DEFINE_string("workdir", None, "output directory", flag_values=fv)
    fv(list(argv))
    if fv["config"].value is None or not fv["workdir"].value:
        raise UsageError("--config and --workdir are required")
    return fv["config"].value, fv["workdir"].value


def cli(argv) -> int | None:
    """In-process entry: `cli(["crm_jax.main", "--config=...", "--workdir=...", ...])`."""
    maybe_init_distributed()
    return run(*parse_argv(argv))


def main(argv) -> int | None:
    del argv
    maybe_init_distributed()
    return run(_CONFIG.value, _WORKDIR.value)


def console() -> None:
    """The command line (`crm-train`): every failure one `error:` line (crm_jax.errors)."""
    run_command(main)


if __name__ == "__main__":
    console()
