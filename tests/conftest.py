import os

# CPU tests: 8 host devices (sharded steps are compared with single-device ones), and
# one intra-op thread per process so `pytest -n 2` workers don't oversubscribe the cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
