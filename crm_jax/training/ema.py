"""Power-function EMA of EDM2 (Karras et al. 2024), parameterised by sigma_rel.

The average at step t weighs the parameters of step tau by tau^gamma, which is
the EMA with a step-dependent decay beta_t = (1 - 1/t)^(gamma + 1). The relative
width sigma_rel of that profile fixes gamma through

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Solve the cubic for gamma (the largest real root). sigma_rel=0.1 -> gamma ~ 6.94."""
    if not 0 < sigma_rel < 0.5:
        raise ValueError(f"sigma_rel must be in (0, 0.5), got {sigma_rel}")
    s2 = sigma_rel**2
    # s2 (g+2)^2 (g+3) - (g+1) = 0  ->  s2 g^3 + 7 s2 g^2 + (16 s2 - 1) g + (12 s2 - 1) = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real.max())


def ema_decay(step, gamma: float):
    """beta at optimizer step `step` (1-based count of updates so far); 0 at step 1."""
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 1.0)
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def ema_update(ema, params, step, gamma: float):
    """ema <- beta ema + (1 - beta) params, with beta = ema_decay(step, gamma)."""
    beta = ema_decay(step, gamma)
    return jax.tree.map(lambda e, p: (beta * e + (1.0 - beta) * p.astype(e.dtype)).astype(e.dtype), ema, params)
