"""The JAX internals this repository depends on, in one place, checked against the pinned JAX.

No public API answers these questions in the pinned version (`requirements.txt`: jax 0.11.2);
every other module imports them from here. On another JAX version importing this module warns
once (the internals may have moved); a missing internal raises an error naming it.
"""

from __future__ import annotations

import warnings

import jax

PINNED_JAX = "0.11.2"

if jax.__version__ != PINNED_JAX:
    warnings.warn(
        f"pallas_kernels._jax_private is written against jax {PINNED_JAX} (requirements.txt), "
        f"found jax {jax.__version__}: the JAX internals it uses may have changed",
        RuntimeWarning,
        stacklevel=2,
    )


def _missing(what: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{what} is not available in jax {jax.__version__} (this code is pinned to jax {PINNED_JAX}): {err}"
    )


def is_linearizing(x) -> bool:
    """True when `x` (a value of any shape seen by a custom rule) is being partially evaluated
    (`jax.grad` / `jax.vjp` / `jax.linearize`), False for forward mode and concrete values."""
    try:
        from jax._src.interpreters.partial_eval import JaxprTracer
    except ImportError as e:
        raise _missing("jax._src.interpreters.partial_eval.JaxprTracer", e) from None
    return isinstance(x, JaxprTracer)


def jit_cache_size(fn) -> int:
    """How many compiled variants the `jax.jit`-wrapped `fn` holds (its executable cache)."""
    try:
        return int(fn._cache_size())
    except AttributeError as e:
        raise _missing("the cache size of a jitted function (`_cache_size`)", e) from None
