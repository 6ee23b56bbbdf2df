"""Training as the entry points run it: `training.loop.train` with the config's data source and,
when `c.sample_every` is set, a sample writer (`evaluation.samples`)."""

from __future__ import annotations

from crm_jax.data.sources import make_source
from crm_jax.evaluation.samples import write_sample
from crm_jax.training import loop


def sample_hook(run, params, iteration: int) -> str:
    """`loop.train`'s `on_sample`: a sample of `params` in the mode's sampler and pattern."""
    mode = run.tcfg.spec
    method, steps = mode.sampler
    return write_sample(
        run.workdir,
        iteration,
        run.apply,
        params,
        run.mcfg,
        run.source,
        pattern=run.tcfg.pattern(mode.sample_pattern),
        method=method,
        steps=steps,
        rows=min(2, run.c.data.batch_size),
    )


def train(c, workdir: str, **kw) -> dict:
    """Run (or resume) training of config `c` in `workdir` (keywords: those of `loop.train`)."""
    kw.setdefault("on_sample", sample_hook if c.get("sample_every", 0) else None)
    return loop.train(c, workdir, source=make_source, **kw)
