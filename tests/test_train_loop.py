"""The training program: exact resume after a stop or SIGTERM (in-process and on the command line),
refusing foreign workdirs,
teacher pretraining lowering the loss, distillation modes running without NaN."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.base import base_config, toy_model
from crm_jax import pipeline
from crm_jax.data.toy_source import ToySource
from crm_jax.training import run_setup
from crm_jax.training.checkpoints import CheckpointMismatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(mode="teacher_tf", **kw):
    c = base_config(mode, "tiny", **toy_model(num_layers=1))
    c.data.update(num_frames=2, height=16, width=16, batch_size=2)
    c.train.block_frames = 1
    c.train.lr = 1e-3
    c.train.critic_lr = 1e-3
    c.train.guidance = 2.0
    c.num_iterations = 6
    c.log_every = 1
    c.checkpoint.every = 2
    c.checkpoint.async_save = False
    for k, v in kw.items():
        node, _, leaf = k.rpartition(".")
        (c if not node else c[node])[leaf] = v
    return c


def test_stop_and_resume_reproduces_losses(tmp_path):
    c = tiny_config()
    full = pipeline.train(c, str(tmp_path / "a"), progress=False)["losses"]
    first = pipeline.train(c, str(tmp_path / "b"), max_iterations=2, progress=False)["losses"]
    rest = pipeline.train(c, str(tmp_path / "b"), progress=False)["losses"]
    assert sorted(first) == [0, 1] and sorted(rest) == [2, 3, 4, 5]
    for it, v in {**first, **rest}.items():
        assert v == full[it], (it, v, full[it])


def test_sigterm_saves_and_resume_is_exact(tmp_path, monkeypatch):
    c = tiny_config(**{"checkpoint.every": 100})
    full = pipeline.train(c, str(tmp_path / "a"), progress=False)["losses"]
    real = ToySource.batch

    def batch_then_kill(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered mid-run, like a preemption
        return real(self, step)

    monkeypatch.setattr(ToySource, "batch", batch_then_kill)
    first = pipeline.train(c, str(tmp_path / "b"), progress=False)["losses"]
    monkeypatch.setattr(ToySource, "batch", real)
    assert max(first) == 3  # iteration 3 finished, then the checkpoint was written and the run exited
    rest = pipeline.train(c, str(tmp_path / "b"), progress=False)["losses"]
    assert min(rest) == 4
    for it, v in {**first, **rest}.items():
        assert v == full[it]


def test_foreign_workdir_is_refused_untouched(tmp_path):
    pipeline.train(tiny_config(**{"num_iterations": 2}), str(tmp_path), progress=False)
    before = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(tmp_path) for p in fs}
    other = tiny_config(**{"num_iterations": 4})
    other.model.overrides.dim = 32
    with pytest.raises(
        CheckpointMismatch, match=r"another run's checkpoint .*model\.dim: 128 in the checkpoint, 32 now"
    ) as e:
        pipeline.train(other, str(tmp_path), progress=False)
    assert "\n" not in str(e.value) and "ffn_dim" not in str(e.value)  # only the differing fields
    after = {p: os.path.getmtime(os.path.join(r, p)) for r, _, fs in os.walk(tmp_path) for p in fs}
    assert before == after


def test_changed_initialisation_is_not_resumed_over(tmp_path):
    """A stage initialised from another checkpoint (an earlier stage rerun) is refused, not resumed;
    the same checkpoint at another path (a moved checkout, an installed package) resumes."""
    from crm_jax.models import convert
    from crm_jax.models.wan import init_model

    teacher = tmp_path / "teacher"
    c = tiny_config("tf_scm", **{"num_iterations": 2})
    convert.save_nnx(init_model(run_setup.model_config(c), 0), str(teacher))
    c.init.teacher = str(teacher)
    pipeline.train(c, str(tmp_path / "run"), progress=False)
    pipeline.train(c, str(tmp_path / "run"), progress=False)  # unchanged: a rerun resumes (nothing to do)
    os.rename(teacher, tmp_path / "moved")
    c.init.teacher = str(tmp_path / "moved")
    pipeline.train(c, str(tmp_path / "run"), progress=False)  # same checkpoint elsewhere: resumes
    os.rename(tmp_path / "moved", teacher)
    c.init.teacher = str(teacher)
    convert.save_nnx(init_model(run_setup.model_config(c), 1), str(teacher))  # the earlier stage changed
    with pytest.raises(CheckpointMismatch, match=r"init\.teacher\.fingerprint"):
        pipeline.train(c, str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("part", ["state", "meta"])
def test_unreadable_latest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys, part):
    """The newest checkpoint's arrays or its metadata emptied (a crash mid-write, a full disk): the
    run warns naming it, resumes from the older one and reproduces the same losses."""
    c = tiny_config(**{"num_iterations": 4})
    full = pipeline.train(c, str(tmp_path / "a"), progress=False)["losses"]
    pipeline.train(c, str(tmp_path / "b"), max_iterations=4, progress=False)  # checkpoints 2 and 4
    state_dir = tmp_path / "b" / "checkpoints" / "4" / part
    for root, _, files in os.walk(state_dir):
        for f in files:
            open(os.path.join(root, f), "wb").close()  # emptied: unreadable
    c6 = tiny_config(**{"num_iterations": 4})
    rest = pipeline.train(c6, str(tmp_path / "b"), progress=False)["losses"]
    out, err = capsys.readouterr()
    assert "checkpoints/4" in err and "checkpoints_unreadable" in err and "checkpoints/2 (iteration 2)" in out
    assert os.path.isdir(tmp_path / "b" / "checkpoints_unreadable" / "4")  # kept, for inspection
    assert sorted(rest) == [2, 3] and all(rest[i] == full[i] for i in rest)


def test_bad_config_keys_and_mesh(tmp_path):
    c = tiny_config()
    c.train.nonsense = 1
    with pytest.raises(ValueError, match="unknown train config keys"):
        run_setup.train_config(c)
    c = tiny_config(**{"mesh.data": 4})
    c.data.batch_size = 6
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.train(c, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")
    c = tiny_config(**{"precompile": -2})
    with pytest.raises(ValueError, match="precompile must be"):
        pipeline.train(c, str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_teacher_pretraining_lowers_the_loss(tmp_path):
    c = tiny_config(**{"num_iterations": 40, "train.lr": 2e-3, "train.warmup_steps": 5, "checkpoint.every": 1000})
    losses = pipeline.train(c, str(tmp_path), progress=False)["losses"]
    first, last = np.mean([losses[i] for i in range(8)]), np.mean([losses[i] for i in range(32, 40)])
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("mode", ["tf_scm", "sf_dmd", "rcm"])
def test_distillation_modes_run_without_nan(mode, tmp_path):
    c = tiny_config(
        mode,
        **{"num_iterations": 8, "train.tangent_warmup": 2, "train.student_update_freq": 2, "checkpoint.every": 1000},
    )
    c.init.allow_random_teacher = True
    out = pipeline.train(c, str(tmp_path), progress=False)
    assert out["nan_skips"] == 0 and all(np.isfinite(list(out["losses"].values())))
    assert out["step"] >= 3


@pytest.mark.parametrize("mode,mesh", [("tf_scm", (1, 1)), ("sf_dmd", (4, 2))])
def test_host_offload_runs_and_resumes_exactly(tmp_path, mode, mesh):
    """memory.offload keeps the EMA and teacher in host memory (split steps): the plain run's
    losses and final parameters / EMA, also across a stop and resume."""
    c = tiny_config(
        mode,
        **{
            "init.allow_random_teacher": True,
            "num_iterations": 4,
            "mesh.data": mesh[0],
            "mesh.fsdp": mesh[1],
            "data.batch_size": 2 if mesh == (1, 1) else 8,
            "train.student_update_freq": 2,
            "train.sf_max_steps": 1,
            "export": False,
        },
    )
    ref = pipeline.train(c, str(tmp_path / "a"), progress=False)
    c.memory.offload = "ema,teacher"
    first = pipeline.train(c, str(tmp_path / "b"), max_iterations=2, progress=False)
    rest = pipeline.train(c, str(tmp_path / "b"), progress=False)
    losses = {**first["losses"], **rest["losses"]}
    assert sorted(losses) == [0, 1, 2, 3] and rest["step"] == ref["step"] >= 2
    for it, v in losses.items():
        assert v == pytest.approx(ref["losses"][it], rel=1e-6), (it, v, ref["losses"][it])
    got, want = jax.device_get(rest["state"]), jax.device_get(ref["state"])
    for field in ("params", "ema", "critic"):  # relative L2 error of the field (Adam amplifies rounding
        a, b = (jax.tree.leaves(getattr(x, field)) for x in (got, want))  # of near-zero gradients)
        err = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b)) ** 0.5
        assert err <= 1e-6 * sum(float(np.sum(y**2)) for y in b) ** 0.5, field
    assert {x.sharding.memory_kind for x in jax.tree.leaves(rest["state"].ema)} == {"pinned_host"}
    c.memory.offload = "params"
    with pytest.raises(ValueError, match="memory.offload"):
        pipeline.train(c, str(tmp_path / "c"), progress=False)


TINY_RUN_CONFIG = """
from configs.base import base_config, toy_model


def get_config():
    c = base_config("teacher_tf", "tiny", **toy_model(num_layers=1))
    c.data.update(num_frames=2, height=16, width=16, batch_size=2)
    c.train.block_frames = 1
    c.num_iterations = 200
    c.log_every = 1
    c.checkpoint.every = 1000
    return c
"""


def _metrics_lines(workdir) -> int:
    try:
        with open(workdir / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _run_until(cmd, env, workdir, log, *, signum=None, timeout=240):
    """Run `cmd` (output to `log`); with `signum`, send it once a new metrics line shows that
    training runs. Returns (exit code, output)."""
    before = _metrics_lines(workdir)
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        if signum is not None:
            while _metrics_lines(workdir) <= before and p.poll() is None:
                assert time.monotonic() < deadline, "training did not start in time"
                time.sleep(0.02)
            p.send_signal(signum)
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    return rc, open(log).read()


def test_signals_stop_the_command_line_run_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """`python -m crm_jax.main` on a tiny config: SIGTERM mid-training exits 143 after saving a
    checkpoint, the rerun resumes from it and SIGINT exits 130 the same way, the third run finishes."""
    config = tmp_path / "tiny.py"
    config.write_text(TINY_RUN_CONFIG)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "crm_jax.main", f"--config={config}", f"--workdir={workdir}"]
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),  # the reruns skip the compile
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }
    env.pop("CRM_DEBUG", None)
    resumed_at = 0
    for run, signum in enumerate((signal.SIGTERM, signal.SIGINT)):
        rc, out = _run_until(cmd, env, workdir, tmp_path / f"out{run}", signum=signum)
        assert rc == 128 + signum, (rc, out[-3000:])
        assert "Traceback" not in out and "error:" not in out, out[-3000:]
        stop = re.search(rf"stopped by {signal.Signals(signum).name}: checkpoint saved at iteration (\d+)", out)
        assert stop, out[-3000:]
        saved = int(stop.group(1))
        assert resumed_at < saved < 200 and (workdir / "checkpoints" / str(saved)).is_dir(), (resumed_at, saved)
        if run:
            assert f"(iteration {resumed_at})" in out
        resumed_at = saved
    rc, out = _run_until(cmd, env, workdir, tmp_path / "out2")
    assert rc == 0 and f"(iteration {resumed_at})" in out and "teacher_tf: 200 iterations" in out, out[-3000:]
    # the console: the compile is announced and timed before training, the last line says where things are
    lines = out.strip().splitlines()
    compiling = next(i for i, line in enumerate(lines) if line.startswith("compiling 1 step function"))
    assert lines[compiling + 1].startswith("compiled in "), lines
    last = lines[-1]
    assert last.startswith("teacher_tf: 200 iterations") and f"export {workdir / 'export'}" in last, last
    assert f"metrics {workdir / 'metrics.jsonl'}" in last and "Traceback" not in out, last
    with open(workdir / "metrics.jsonl") as f:
        logged = [json.loads(line)["iteration"] for line in f]
    assert sorted(logged) == list(range(1, 201)), logged  # every iteration logged once: none lost or redone
