"""`python -m crm_jax.tools.aot`: compile a config's steps without running them; bad input gets one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from crm_jax.training import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "crm_jax.tools.aot", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "name,want",
    [
        ("v5p:2x2x2", ("v5:2x2x2", (2, 2, 2))),
        ("v5e:2x4", ("v5e:2x4", (2, 4))),
        ("v4:2x2x1", ("v4:2x2x1", (2, 2, 1))),
        ("v6e:1x1", ("v6e:1x1", (1, 1))),
    ],
)
def test_topology_names(name, want):
    assert aot.parse_topology(name) == want


@pytest.mark.parametrize(
    "name,match",
    [
        ("v9:2x2", "unknown TPU topology"),
        ("v5p:2x2", "3-D"),
        ("v5e:2x2x2", "2-D"),
        ("v5e:0x2", "empty"),
        ("tpu", "unknown"),
    ],
)
def test_bad_topology_names(name, match):
    with pytest.raises(aot.TopologyError, match=match):
        aot.parse_topology(name)


def test_step_plans_cover_every_step_function_of_a_run():
    from configs import toy_rcm, toy_sf_dmd, toy_tf_scm
    from crm_jax.training import run_setup
    from crm_jax.training.steps import Trainer

    for mod in (toy_tf_scm, toy_sf_dmd, toy_rcm):
        c = mod.get_config()
        trainer = Trainer(run_setup.train_config(c), None, run_setup.model_config(c))
        want = sorted({trainer.plan(i, trainer.cfg.student_update_freq) for i in range(c.num_iterations)})
        assert aot.step_plans(c, trainer) == want


def test_cli_compiles_a_toy_config_for_the_local_devices(tmp_path):
    out = tmp_path / "steps.json"
    p = _run("--config=configs/toy_tf_scm.py", "--topology=local", f"--json={out}", "--config.data.batch_size=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| student | yes |" in p.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["flops"] > 0 and rows[0]["temp"] > 0


@pytest.mark.parametrize(
    "args,match",
    [
        (["--topology=v9:2x2"], "error: unknown TPU topology 'v9:2x2'"),
        (["--topology=local", "--config.mesh.fsdp=64"], "= 64 devices, but local has 8 devices"),
        (["--topology=local", "--config.data.batch_size=3", "--config.mesh.fsdp=2"], "batch size 3 is not divisible"),
    ],
)
def test_cli_bad_input_gets_one_line(args, match):
    p = _run("--config=configs/toy_tf_scm.py", *args, timeout=300)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and match in lines[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
