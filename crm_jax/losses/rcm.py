"""rCM combination of the consistency (sCM / dCM) and DMD student losses."""

from __future__ import annotations

import jax.numpy as jnp


def rcm_loss(cm_out: tuple, dmd_out: tuple, *, dmd_weight: float = 1.0):
    """rCM student loss ``100 * L_sCM + lambda * L_DMD`` from two ``(loss, metrics)`` pairs.

    The factor 100 is NOT applied here: ``scm_trigflow_loss`` / ``scm_rf_loss`` / ``dcm_loss`` already
    return ``100 * L`` (their ``loss_scale=100`` default) and ``dmd_loss`` returns ``L_DMD`` (its
    ``loss_scale=1``). This function only adds::

        loss = cm_loss + dmd_weight * dmd_loss          (dmd_weight = lambda = 1 by default)

    Either part may be ``None`` (e.g. sCM-only during tangent warm-up). Metrics are merged with the
    prefixes ``cm/`` and ``dmd/`` plus ``loss``.
    """
    if cm_out is None and dmd_out is None:
        raise ValueError("rcm_loss needs at least one of cm_out, dmd_out")
    total = jnp.asarray(0.0)
    metrics = {}
    if cm_out is not None:
        total = total + cm_out[0]
        metrics.update({f"cm/{k}": v for k, v in cm_out[1].items()})
    if dmd_out is not None:
        total = total + dmd_weight * dmd_out[0]
        metrics.update({f"dmd/{k}": v for k, v in dmd_out[1].items()})
    metrics["loss"] = total
    return total, metrics
