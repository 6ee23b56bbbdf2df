"""Pure loss functions of Causal-rCM.

Every loss is a plain function of network callables, arrays and an explicit PRNG key and returns
``(loss, metrics)`` (scalar loss, dict of scalar metrics). Network callables follow the project
convention ``fn(x, t, cond) -> RF velocity`` (RF time ``t`` in [0, 1], ``[B]`` or ``[B, T]``);
MeanFlow's is ``u_fn(z, r, t, cond)``. See ``docs/losses.md`` for a summary.

Scales: ``scm_trigflow_loss``, ``scm_rf_loss`` and ``dcm_loss`` include the factor 100
(``loss_scale=100``); the others use ``loss_scale=1``; ``rcm_loss`` just adds ``cm + lambda * dmd``.
"""

from crm_jax.losses.common import bell_weight, jvp_time_derivative, warmup_ratio
from crm_jax.losses.dcm import dcm_loss, dcm_times
from crm_jax.losses.dmd import critic_loss, dmd_loss
from crm_jax.losses.flow_matching import diffusion_forcing_loss, flow_matching_loss, teacher_forcing_loss
from crm_jax.losses.meanflow import meanflow_loss, meanflow_target, sample_meanflow_times
from crm_jax.losses.ode_regression import ode_regression_loss
from crm_jax.losses.rcm import rcm_loss
from crm_jax.losses.scm import scm_rf_loss, scm_trigflow_loss

__all__ = [
    "bell_weight",
    "jvp_time_derivative",
    "warmup_ratio",
    "flow_matching_loss",
    "teacher_forcing_loss",
    "diffusion_forcing_loss",
    "scm_trigflow_loss",
    "scm_rf_loss",
    "meanflow_loss",
    "meanflow_target",
    "sample_meanflow_times",
    "dcm_loss",
    "dcm_times",
    "dmd_loss",
    "critic_loss",
    "ode_regression_loss",
    "rcm_loss",
]
