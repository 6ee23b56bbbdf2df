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


def test_a_signal_stops_the_demo_at_its_stage_and_a_rerun_goes_on(tmp_path, monkeypatch, capsys):
    """The demo's stage runner in-process, with stand-ins for the stages' work (the real stages take
    minutes to interrupt and rerun; their resuming is tested above and in tests/test_train_loop.py):
    SIGTERM or SIGINT during a stage ends the demo there with one line naming the stage and exit
    code 128 + signal, no later stage runs, and a rerun goes on from that stage to the end."""
    import signal
    import time

    import numpy as np

    from crm_jax import demo, main
    from crm_jax.config_files import load_config

    c = load_config("configs/toy_demo.py")
    calls, stop_at = [], {}

    def signalled(stage):
        signum = stop_at.pop(stage, None)
        if signum is not None:
            os.kill(os.getpid(), signum)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the handler raises at the next bytecode
                time.sleep(0.01)
            raise AssertionError(f"{stage}: the signal was not handled")

    def fake_generate(g, out):
        calls.append("synthetic")
        signalled("synthetic")

    def fake_train(cfg, workdir):
        calls.append(cfg.mode)
        signalled(cfg.mode)  # during a stage's setup or compile
        stopped = stop_at.pop(cfg.mode + " loop", None)  # what the training loop returns after its checkpoint
        os.makedirs(os.path.join(workdir, "export"), exist_ok=True)
        return {"stopped_by": stopped}

    def fake_evaluate(c, teacher, src, exports):
        calls.append("evaluation")
        signalled("evaluation")
        video = np.zeros((1, 2, 4, 4, 3), np.float32)
        row = dict(trajectory_error=0.0, action_following=1.0, background_error=0.0, ms_per_frame=1.0)
        return {name: {**row, "frames": video, "truth": video} for name in ("teacher", *exports)}

    monkeypatch.setattr(demo, "generate", fake_generate)
    monkeypatch.setattr(demo.pipeline, "train", fake_train)
    monkeypatch.setattr(demo, "_evaluate_all", fake_evaluate)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    runs = [
        ("synthetic", signal.SIGTERM, "the synthetic set stopped by SIGTERM", ["synthetic"]),
        ("tf_scm loop", signal.SIGTERM, "TF-sCM stopped by SIGTERM", ["synthetic", "tf_scm"]),
        ("sf_dmd", signal.SIGINT, "SF-DMD stopped by SIGINT", ["synthetic", "tf_scm", "sf_dmd"]),
        (
            "evaluation",
            signal.SIGTERM,
            "the evaluation stopped by SIGTERM",
            ["synthetic", "tf_scm", "sf_dmd", "evaluation"],
        ),
    ]
    for where, signum, line, ran in runs:
        calls.clear()
        stop_at[where] = signum
        capsys.readouterr()
        assert main._run_demo(c, str(tmp_path)) == 128 + signum
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == f"demo: {line}; rerun the demo to resume it", out
        assert calls == ran and not stop_at
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # the demo's handlers are gone
    calls.clear()
    assert main._run_demo(c, str(tmp_path)) is None
    assert calls == ["synthetic", "tf_scm", "sf_dmd", "evaluation"]
    assert (tmp_path / "demo_metrics.md").exists() and (tmp_path / "demo.gif").exists()
