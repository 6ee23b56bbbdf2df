import os

# CPU tests: 8 host devices (sharded steps are compared with single-device ones), and
# one intra-op thread per process so `pytest -n 2` workers don't oversubscribe the cores.
# The tests' models are tiny, so XLA's compile time dominates them: LLVM's backend
# optimisation is off (`CPU_COMPILE_FAST`; the arithmetic is the same, fast-math stays off),
# which took the demo's end-to-end test from over 25 minutes to under 3 on the 2-core CI
# machine (experiments/RESULTS.md). Subprocesses (the CLI tests) inherit these flags.
CPU_COMPILE_FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      f"--xla_cpu_multi_thread_eigen=false {CPU_COMPILE_FAST}")
