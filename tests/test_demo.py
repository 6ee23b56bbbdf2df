"""The embedded demo end to end at a tiny budget, as `make demo` runs it (the real run's numbers:
docs/benchmarks.md): every stage runs, the outputs are written, and the console stays short."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BUDGET = (
    "--config.demo.synthetic_samples=8",
    "--config.demo.scm_iterations=2",
    "--config.demo.dmd_iterations=2",
    "--config.demo.eval_episodes=2",
    "--config.demo.teacher_steps=2",
)


def test_demo_pipeline_runs_end_to_end_with_a_short_console(tmp_path):
    cmd = [sys.executable, "-m", "crm_jax.main", "--config=configs/toy_demo.py", f"--workdir={tmp_path}", *TINY_BUDGET]
    p = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=1200
    )
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (p.stdout + p.stderr).count("\n")
    assert lines < 40, p.stdout + p.stderr  # no library INFO logs; one line per stage and the table
    assert os.path.getsize(tmp_path / "demo.gif") > 0
    table = (tmp_path / "demo_metrics.md").read_text()
    assert "TF-sCM + SF-DMD, 2 steps" in table and "teacher" in table and "background error" in table
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    for name, row in metrics.items():
        if name != "timings":
            assert 0.0 <= row["action_following"] <= 1.0 and row["trajectory_error"] >= 0.0
            assert 0.0 <= row["background_error"] <= 1.0
    # a rerun resumes every finished stage: nothing is retrained, the exports are kept
    export = tmp_path / "sf_dmd" / "export" / "wan_config.json"
    mtime = os.path.getmtime(export)
    p = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=1200
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.getmtime(export) == mtime
