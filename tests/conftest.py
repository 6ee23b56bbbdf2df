import os

# CPU tests: 8 host devices (sharded steps are compared with single-device ones), and
# one intra-op thread per process so `pytest -n 2` workers don't oversubscribe the cores.
# The tests' models are tiny, so XLA's compile time dominates them: LLVM's backend
# optimisation is off (`CPU_COMPILE_FAST`; the arithmetic is the same, fast-math stays off),
# which took the demo's end-to-end test from over 25 minutes to under 3 on the 2-core CI
# machine (docs/benchmarks.md). Subprocesses (the CLI tests) inherit these flags.
CPU_COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", f"--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false {CPU_COMPILE_FAST}"
)

import gc  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Single-device CPU computations run inline, not dispatched asynchronously. Pallas' interpret
# modes run a kernel's threads as JAX computations started from an io_callback; a computation the
# test dispatches meanwhile (the next call, a model init) can deadlock with them: a pytest worker
# hung that way in `test_streaming_with_mgpu_cache_attention_matches_xla`.
jax.config.update("jax_cpu_enable_async_dispatch", False)


def _mapping_count():
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def _mapping_limit():
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):  # not readable here (some containers): the kernel's default
        return 65530


@pytest.fixture(autouse=True)
def _bounded_memory_mappings():
    """Drop JAX's compiled executables when the process nears the kernel's mapping limit.

    Each executable the XLA CPU JIT loads holds about three memory mappings, and JAX's
    caches keep them alive, so one long-lived pytest-xdist worker collects tens of
    thousands over the suite and reaches `vm.max_map_count` (65,530 by default), where
    the next compile crashes inside LLVM (the CI worker aborts of session 11). Past half
    the limit, `jax.clear_caches()` releases them; below it the caches keep saving compiles.
    """
    yield
    if not os.path.exists("/proc/self/maps"):
        return
    before = _mapping_count()
    if before > _mapping_limit() // 2:
        jax.clear_caches()
        gc.collect()
        if os.environ.get("CRM_DEBUG_MAPS"):
            print(f"\n[maps] cleared JAX caches: {before} -> {_mapping_count()} mappings", flush=True)


@pytest.fixture(autouse=True)
def _seeded_random_inputs(request):
    """Each test draws the attention tests' random inputs from a seed fixed by its node id, so
    it sees the same inputs whichever tests run with it and in whatever order."""
    helpers = sys.modules.get("tests.attention_helpers")
    if helpers is not None:
        helpers.seed(request.node.nodeid)
    yield


def pytest_collection_modifyitems(config, items):
    """The long TPU compile checks first, so that pytest-xdist spreads the rest around them."""
    items.sort(key=lambda item: item.get_closest_marker("tpu_compile") is None)
