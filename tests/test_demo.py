"""The embedded demo end to end at a tiny budget (the real run: `make demo`, numbers in docs/benchmarks.md)."""

import json
import os

from configs.toy_demo import get_config
from crm_jax.demo import run_demo

ROOT = os.path.dirname(os.path.dirname(__file__))


def test_demo_pipeline_runs_end_to_end(tmp_path):
    c = get_config()
    c.demo.teacher = os.path.join(ROOT, "assets", "toy_teacher")
    c.demo.update(synthetic_samples=8, scm_iterations=2, dmd_iterations=2, eval_episodes=2, teacher_steps=2)
    summary = run_demo(c, str(tmp_path))
    assert os.path.getsize(tmp_path / "demo.gif") > 0
    table = (tmp_path / "demo_metrics.md").read_text()
    assert "TF-sCM + SF-DMD, 2 steps" in table and "teacher" in table
    metrics = json.loads((tmp_path / "demo_metrics.json").read_text())
    assert set(summary) == set(metrics)
    for name, row in metrics.items():
        if name != "timings":
            assert 0.0 <= row["action_following"] <= 1.0 and row["trajectory_error"] >= 0.0
