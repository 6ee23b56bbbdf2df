"""Multi-process runs on this machine: 2 processes x 4 CPU devices against 1 process x 8.

Every process is a real `python` subprocess joined through `jax.distributed` (gloo collectives
on CPU) by the documented environment variables, on a free 127.0.0.1 port, with a timeout
after which every process of the run is killed, so no test can hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests.conftest import CPU_COMPILE_FAST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(devices: int, **extra) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        PYTHONUNBUFFERED="1",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        f"--xla_cpu_multi_thread_eigen=false {CPU_COMPILE_FAST}",
    )
    for k in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    ):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Run:
    """`n` processes of `argv` (n = 1: a plain single process with 8 devices; n = 2: a cluster of
    2 x 4 devices through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)."""

    def __init__(self, argv, n: int, logdir, name: str, **env):
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(logdir, "jax_cache"))  # reruns skip compiles
        self.logs = [open(os.path.join(logdir, f"{name}-{i}.log"), "w+") for i in range(n)]
        port = free_port()
        self.procs = []
        for i in range(n):
            e = (
                env_for(8 // n, **env)
                if n == 1
                else env_for(
                    8 // n,
                    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                    JAX_NUM_PROCESSES=n,
                    JAX_PROCESS_ID=i,
                    CRM_DIST_HEARTBEAT_TIMEOUT=HEARTBEAT_S,
                    CRM_DIST_INIT_TIMEOUT=60,
                    **env,
                )
            )
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, *argv], env=e, cwd=ROOT, stdout=self.logs[i], stderr=subprocess.STDOUT
                )
            )

    def output(self, i: int) -> str:
        self.logs[i].flush()
        self.logs[i].seek(0)
        return self.logs[i].read()

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float, stop_on_failure: bool = True) -> list[int]:
        """Exit codes. On timeout, or (`stop_on_failure`) once a process has failed, every process
        still running is killed; a timeout fails the test with their output."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs):
            failed = stop_on_failure and any(p.poll() not in (None, 0) for p in self.procs)
            if failed or time.monotonic() > deadline:
                self.kill()
                if not failed:
                    pytest.fail(f"timed out after {timeout} s:\n" + self.tails())
            time.sleep(0.1)
        return [p.returncode for p in self.procs]

    def tails(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.output(i)[-3000:]}" for i in range(len(self.procs)))

    def check(self, timeout: float):
        rcs = self.wait(timeout)
        assert rcs == [0] * len(rcs), f"exit codes {rcs}\n" + self.tails()


# ----------------------------------------------------------------------------- train steps

STEPS = textwrap.dedent("""
    import functools, sys
    import numpy as np
    from crm_jax import distributed as dist
    dist.maybe_init_distributed()
    import jax, jax.numpy as jnp
    from crm_jax.data import toy_world as tw
    from crm_jax.data.toy_source import ToySource
    from crm_jax.models.config import TINY
    from crm_jax.models.wan import functional, init_model
    from crm_jax.training import sharding as shd
    from crm_jax.training.steps import Frozen, TrainConfig, Trainer

    B = 8
    assert jax.device_count() == 8, jax.devices()
    mcfg = TINY.replace(num_layers=1, num_actions=5, in_channels=12, out_channels=12)
    world = tw.ToyWorldConfig(num_frames=2, height=8, width=8)
    src = ToySource(world, B, mcfg.text_len, mcfg.text_dim, seed=3, process_index=jax.process_index(),
                    process_count=jax.process_count())
    local = {k: v for k, v in src.batch(5).items() if k in ("latents", "context", "actions")}
    assert local["latents"].shape[0] == B // jax.process_count()   # this host's rows only
    mesh = shd.make_mesh(2, 2, 2)
    apply, params = functional(init_model(mcfg, 0))
    teacher_apply, teacher = functional(init_model(mcfg, 1))
    out = {"rows": np.asarray(dist.process_rows(B))}
    for mode, which in [("tf_scm", "student"), ("sf_dmd", "student"), ("sf_dmd", "critic")]:
        tcfg = TrainConfig(mode=mode, block_frames=1, lr=1e-3, critic_lr=1e-3, guidance=2.0)
        trainer = Trainer(tcfg, apply, mcfg, teacher_apply=teacher_apply)
        state = trainer.init_state(params, critic=teacher if tcfg.has_critic else None)
        frozen = Frozen(teacher, teacher, jnp.zeros((mcfg.text_len, mcfg.text_dim)))
        fn = trainer.student_step if which == "student" else trainer.critic_step
        kw = dict(sf_steps=1) if which == "critic" else dict(sf_steps=1, use_dmd=True)
        key = jax.random.key(7)
        st_sh, fr_sh = shd.state_shardings(state, mesh), shd.state_shardings(frozen, mesh)
        b_sh, k_sh = shd.batch_shardings(local, mesh, B), shd.replicated(key, mesh)
        step = shd.jit_step(functools.partial(fn, **kw), mesh, (st_sh, fr_sh, b_sh, k_sh), (st_sh, None))
        new, m = step(shd.global_put(state, st_sh), shd.global_put(frozen, fr_sh),
                      shd.global_batch(local, b_sh, B), shd.global_put(key, k_sh))
        moved = dist.to_host(new.params if which == "student" else new.critic)
        out[f"{mode}-{which}-loss"] = np.asarray(float(m["loss"]))
        for i, leaf in enumerate(jax.tree.leaves(moved)):
            out[f"{mode}-{which}-{i}"] = np.asarray(leaf)
    if dist.is_main_process():
        np.savez(sys.argv[1], **out)
    if jax.process_count() > 1:
        try:
            dist.agree(jax.process_index(), "a per-process value")
        except dist.ClusterError as e:
            print("DISAGREE:", e, flush=True)
    print("STEPS_OK", jax.process_index(), flush=True)
""")


def rel_tree(a: list, b: list) -> float:
    """Relative L2 distance of two lists of arrays, as one vector."""
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in zip(a, b))
    return (num / sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)) ** 0.5


def test_steps_two_processes_equal_one_process(tmp_path):
    """TF-sCM / SF-DMD student and critic steps on a 2x2x2 (data, fsdp, context) mesh: 2
    processes, each giving only its rows of the toy batch, equal 1 process with all 8 devices
    (loss and parameters); `distributed.agree` names each process's value when they differ."""
    runs = [Run(["-c", STEPS, str(tmp_path / f"{n}.npz")], n, tmp_path, f"steps{n}") for n in (1, 2)]
    for r in runs:
        r.check(300)
    one, two = np.load(tmp_path / "1.npz"), np.load(tmp_path / "2.npz")
    assert list(one["rows"]) == [0, 8] and list(two["rows"]) == [0, 4]  # process 0's rows
    assert set(one.files) == set(two.files) and len(one.files) > 10
    for case in ("tf_scm-student", "sf_dmd-student", "sf_dmd-critic"):
        loss1, loss2 = float(one[f"{case}-loss"]), float(two[f"{case}-loss"])
        assert np.isfinite(loss1) and abs(loss2 - loss1) <= 1e-5 * max(1.0, abs(loss1)), (case, loss1, loss2)
        keys = sorted(k for k in one.files if k.startswith(case) and not k.endswith("loss"))
        assert len(keys) > 5 and all(np.all(np.isfinite(one[k])) for k in keys)
        assert rel_tree([two[k] for k in keys], [one[k] for k in keys]) <= 1e-5, case
    assert "STEPS_OK 1" in runs[1].output(1)
    assert "DISAGREE: processes disagree on a per-process value: process 0: 0, process 1: 1" in runs[1].output(0)


# ----------------------------------------------------------------------------- the training program


def main_argv(workdir, iterations: int) -> list[str]:
    return [
        "-m",
        "crm_jax.main",
        "--config=configs/toy_teacher_tf.py",
        f"--workdir={workdir}",
        "--config.model.overrides.num_layers=1",
        "--config.data.num_frames=2",
        "--config.data.height=8",
        "--config.data.width=8",
        "--config.data.batch_size=8",
        "--config.train.block_frames=1",
        "--config.train.warmup_steps=0",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        f"--config.num_iterations={iterations}",
        "--config.log_every=1",
        "--config.checkpoint.every=2",
        "--config.checkpoint.keep=100",
        "--config.checkpoint.async_save=False",
    ]


def metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_main_two_processes_killed_resume_exactly(tmp_path):
    """`python -m crm_jax.main` as 2 processes: killing one mid-run makes the other exit with
    JAX's error within the heartbeat timeout (no hang); the checkpoints written before stay,
    the relaunched pair resumes from them, and process 0 alone writes metrics equal to 1 process."""
    wd = tmp_path / "two"
    first = Run(main_argv(wd, 1000), 2, tmp_path, "first")
    deadline = time.monotonic() + 300
    while not checkpoint_steps(wd):  # the first checkpoint is complete (Orbax renames it when done)
        if time.monotonic() > deadline or any(p.poll() is not None for p in first.procs):
            first.kill()
            pytest.fail("no checkpoint written:\n" + first.tails())
        time.sleep(0.2)
    first.procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rcs = first.wait(HEARTBEAT_S + 60, stop_on_failure=False)
    took = time.monotonic() - t0
    assert rcs[0] != 0 and took < HEARTBEAT_S + 60, (rcs, took)
    assert "another task died" in first.output(0) or "Gloo" in first.output(0), first.tails()
    saved = checkpoint_steps(wd)
    assert saved and saved[0] == 2, saved
    last = saved[-1]
    total = last + 3

    ref = Run(main_argv(tmp_path / "one", total), 1, tmp_path, "ref")
    resumed = Run(main_argv(wd, total), 2, tmp_path, "resumed")
    resumed.check(300)
    ref.check(300)
    assert f"(iteration {last})" in resumed.output(0)  # resumed from the last complete checkpoint
    assert "teacher_tf:" in resumed.output(0) and "teacher_tf:" not in resumed.output(1)  # process 0 prints
    assert checkpoint_steps(wd)[-1] == total
    rows = metrics(wd)
    its = [r["iteration"] for r in rows]
    cut = len(its) - (total - last)  # the first run's rows, then the resumed run's: each once
    assert cut >= last and its[:cut] == list(range(1, cut + 1)) and its[cut:] == list(range(last + 1, total + 1)), its
    want = {r["iteration"]: r for r in metrics(tmp_path / "one")}
    got = {r["iteration"]: r for r in rows}  # the resumed run's rows replace the first run's
    assert sorted(got) == sorted(want) == list(range(1, total + 1))
    for it in want:
        for k, v in want[it].items():
            assert got[it][k] == pytest.approx(v, rel=1e-5, abs=1e-7), (it, k, got[it][k], v)
    from crm_jax.models import convert  # exports (process 0's, 1 process's): the same weights

    got, want = (
        jax.tree.leaves(nnx.state(convert.load_nnx(str(d / "export")), nnx.Param)) for d in (wd, tmp_path / "one")
    )
    assert len(got) == len(want) > 5
    assert rel_tree(got, want) <= 1e-5
    if os.path.isdir(wd / "tb"):  # one event file per run (the first and the resumed), from process 0
        assert len(os.listdir(wd / "tb")) == 2, os.listdir(wd / "tb")


# ----------------------------------------------------------------------------- dataset generation


def gen_argv(out, *extra) -> list[str]:
    return [
        "-m",
        "crm_jax.data.generate",
        "--config=configs/toy_generate.py",
        f"--out={out}",
        "--config.allow_random_teacher=True",
        "--config.model.overrides.num_layers=1",
        "--config.model.overrides.dim=32",
        "--config.model.overrides.ffn_dim=64",
        "--config.model.overrides.num_heads=2",
        "--config.num_samples=10",
        "--config.samples_per_shard=4",
        "--config.batch_size=8",
        "--config.latent_shape=(2, 4, 4, 12)",
        "--config.sampler.num_steps=2",
        *extra,
    ]


def test_generate_two_processes_write_disjoint_shards(tmp_path):
    """2 processes write disjoint blocks of shards (process 0: shard 0, process 1: shards 1-2 of 3);
    together, and resumed, they equal the 1-process dataset byte for byte."""
    from crm_jax.data import dataset as ds

    ref = Run(gen_argv(tmp_path / "one"), 1, tmp_path, "gen1")
    part = Run(gen_argv(tmp_path / "two", "--max_shards=1"), 2, tmp_path, "gen2a")
    part.check(240)
    shards = sorted(n for n in os.listdir(tmp_path / "two") if ds.is_shard(n))
    assert shards == [ds.shard_name(0, 3), ds.shard_name(1, 3)]  # each process's first shard
    assert not ds.read_metadata(str(tmp_path / "two"))["complete"]
    Run(gen_argv(tmp_path / "two"), 2, tmp_path, "gen2b").check(240)
    ref.check(240)
    assert ds.read_metadata(str(tmp_path / "two"))["complete"]
    for j in range(3):
        a, b = (open(tmp_path / d / ds.shard_name(j, 3), "rb").read() for d in ("one", "two"))
        assert a == b, j
    assert not [n for n in os.listdir(tmp_path / "two") if ".tmp" in n]


# ----------------------------------------------------------------------------- bad input


def test_bad_cluster_input_gives_one_clear_error(tmp_path):
    """Unreachable coordinator, inconsistent process ids, a batch that does not divide."""
    from crm_jax import distributed as dist

    env = env_for(
        4,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        JAX_NUM_PROCESSES=2,
        JAX_PROCESS_ID=1,
        CRM_DIST_INIT_TIMEOUT=2,
    )
    r = subprocess.run(
        [sys.executable, *main_argv(tmp_path / "x", 2)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "error: process 1 of 2: coordinator 127.0.0.1:" in r.stderr, r.stderr[-2000:]
    assert "not reachable within 2 s" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(dist.ClusterError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        dist.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(dist.ClusterError, match="JAX_NUM_PROCESSES is not set"):
        dist.cluster_from_env({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(dist.ClusterError, match="global batch size 6 does not divide over 4 processes"):
        dist.local_batch_size(6, 4)
    assert dist.cluster_from_env({}) is None
    assert dist.cluster_from_env({"SLURM_NTASKS": "4", "SLURM_PROCID": "3"})["num_processes"] == 4
    assert dist.cluster_from_env({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"})["process_id"] == 1
    tpu = dist.cluster_from_env({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_WORKER_ID": "2"})
    assert tpu == dict(launcher="cloud_tpu", num_processes=4, process_id=2, coordinator=None)
    assert dist.cluster_from_env({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}) is None
    assert [dist.process_rows(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]
