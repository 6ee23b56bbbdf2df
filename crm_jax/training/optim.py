"""Optimizers: AdamW with linear warm-up, optional clipping and gradient accumulation (optax)."""

from __future__ import annotations

import optax


def make_optimizer(
    lr: float,
    *,
    b1: float = 0.0,
    b2: float = 0.999,
    weight_decay: float = 0.01,
    warmup_steps: int = 0,
    grad_clip: float = 0.0,
    accumulate: int = 1,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """AdamW (docs/design.md defaults beta = (0, 0.999), wd 0.01) with linear lr warm-up.

    grad_clip > 0 clips the global norm first; accumulate > 1 averages that many
    micro-batch gradients before an update (optax.MultiSteps).
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx
