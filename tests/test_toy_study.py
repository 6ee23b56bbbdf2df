"""The toy study's job DAG, scheduler, configs and report (experiments/toy_study.py).

The full study runs on a GPU; here: its structure, the scheduler with stand-in jobs, every
job kind's config, the claim checks and plots on a synthetic workdir, and one real slice of
the DAG (classifier, teachers, synthetic set, a TF-sCM student) at the smoke scale.
"""

import json
import os
import sys

import numpy as np
import pytest

from experiments import toy_study as ts
from experiments import toy_study_report as rep


def test_dag_is_complete_and_acyclic():
    jobs = ts.all_jobs()
    for j in jobs.values():
        assert set(j.deps) <= set(jobs), j.name
    order, seen = [], set()

    def visit(n, stack=()):
        assert n not in stack, f"cycle through {n}"
        if n not in seen:
            for d in jobs[n].deps:
                visit(d, stack + (n,))
            seen.add(n)
            order.append(n)

    for n in jobs:
        visit(n)
    assert len(order) == len(jobs)
    assert all(not jobs[n].deps for n in ts.GROUPS["prep"])
    final = set(jobs["final_c2"].deps)
    assert {"tf_scm_c2", "tf_dcm_c2", "ode_init_c2", "dmd_scm", "dmd_none", "dmd_bidir"} <= final
    assert jobs["dmd_bidir_tf"].deps == ("teacher_bi", "teacher_c2", "classifier")  # each once
    assert jobs["dmd_bidir_tf"].args == ("teacher_bi", "tf") and "dmd_bidir_tf" in ts.GROUPS["dmd_tf"]
    # claim 1's variants: each distils from its own pattern's teacher
    assert jobs["tf_scm_c1_nonorm"].deps == ("teacher_c1", "classifier")
    assert jobs["tf_dcm_c2_seed1"].args == ("tf_dcm", 2, (("seed", 1),)) and "tf_dcm_c2_seed1" in ts.GROUPS["ablations"]


def test_claim1_variants_change_one_thing_of_the_recipe(tmp_path):
    from crm_jax.training import run_setup

    study, jobs = ts.Study(str(tmp_path), "full"), ts.all_jobs()
    for name in ts.ABLATIONS:
        c = ts.student_job_config(study, jobs[name])
        ref = ts.student_job_config(study, jobs["_".join(name.split("_")[:3])])  # tf_scm_c1_nonorm -> tf_scm_c1
        diff = {k for k in ref.train if ref.train[k] != c.train[k]}
        if name.endswith("seed1"):
            assert not diff and (c.seed, c.data.seed) == (ref.seed + 1, ref.data.seed + 1), name
        else:
            assert len(diff) == 1 and (c.seed, c.data.seed) == (ref.seed, ref.data.seed), (name, diff)
        run_setup.train_config(c)  # a valid train config
    assert run_setup.train_config(ts.student_job_config(study, jobs["tf_scm_c1_nonorm"])).tangent_normalise is False
    assert ts.student_job_config(study, jobs["tf_scm_c2_highnoise"]).train.p_mean == 0.7


def _fake(study, name):
    """Stand-in job: succeeds (writing done.json) unless its name is in FAIL."""
    code = (
        "import json, os, sys; d = sys.argv[1]; n = sys.argv[2]; "
        "sys.exit(1) if n in os.environ.get('FAIL', '').split(',') else None; "
        "os.makedirs(os.path.join(d, n), exist_ok=True); "
        "json.dump({'job': n}, open(os.path.join(d, n, 'done.json'), 'w'))"
    )
    return [sys.executable, "-c", code, study.workdir, name]


def test_scheduler_runs_dependencies_skips_finished_and_blocks_after_failures(tmp_path, monkeypatch):
    study = ts.Study(str(tmp_path), "smoke")
    os.makedirs(tmp_path / "classifier")
    (tmp_path / "classifier" / "done.json").write_text("{}")
    monkeypatch.setenv("FAIL", "teacher_c1")
    status = ts.schedule(study, ["final_c1", "tf_scm_c2"], parallel=3, command=_fake)
    assert status["classifier"] == "skipped"
    assert status["teacher_c1"] == "failed"
    assert status["tf_scm_c1"] == "blocked" and status["final_c1"] == "blocked"
    assert status["tf_scm_c2"] == "done" and status["teacher_c2"] == "done"
    assert "data" not in status and "teacher_bi" not in status  # TF students train on simulator clips
    assert (tmp_path / "logs" / "teacher_c1.log").exists()
    with pytest.raises(ValueError, match="unknown job"):
        ts.schedule(study, ["nope"], parallel=1, command=_fake)


def test_scheduler_does_not_rerun_the_dependencies_of_a_finished_job(tmp_path):
    """ode_init_c2 needs data, which needs teacher_bi: once ode_init_c2 is done, a job that only
    needs ode_init_c2 (its SF-DMD) runs without retraining them."""
    study = ts.Study(str(tmp_path), "smoke")
    for job in ("ode_init_c2", "teacher_c2", "classifier"):
        os.makedirs(tmp_path / job)
        (tmp_path / job / "done.json").write_text("{}")
    status = ts.schedule(study, ["dmd_ode_causal"], parallel=2, command=_fake)
    assert status == {
        "dmd_ode_causal": "done",
        "ode_init_c2": "skipped",
        "teacher_c2": "skipped",
        "classifier": "skipped",
    }


def test_budget_overrides_reach_the_jobs_and_bad_ones_are_refused(tmp_path):
    study = ts.Study(str(tmp_path), "full", overrides={"dmd_iters": 800})
    assert study.S["dmd_iters"] == 800 and ts.SCALES["full"]["dmd_iters"] == 300  # the table is untouched
    assert ts.dmd_config(study, "tf_scm_c2").num_iterations == 800
    cmd = ts.job_command(study, "dmd_scm")
    assert cmd[cmd.index("--set") + 1] == "dmd_iters=800" and cmd[-2:] == ["--job", "dmd_scm"]
    assert ts.budget_override("dmd_iters=5") == ("dmd_iters", 5)
    with pytest.raises(ValueError, match="unknown budget"):
        ts.Study(str(tmp_path), "full", overrides={"dmd_iter": 800})
    with pytest.raises(ValueError, match="positive integers"):
        ts.Study(str(tmp_path), "full", overrides={"dmd_iters": 0})
    for bad in ("dmd_iters", "dmd_iters=many", "dmd_iters=1.5"):
        with pytest.raises(SystemExit):
            ts.main(["--workdir", str(tmp_path), "--set", bad])


def test_every_job_kind_builds_a_valid_config(tmp_path):
    from crm_jax.training import run_setup

    study = ts.Study(str(tmp_path), "full")
    configs = [
        ts.teacher_config(study, "teacher_tf", 2),
        ts.teacher_config(study, "teacher_full", 1),
        ts.dmd_config(study, "tf_scm_c2"),
    ]
    configs += [ts.student_config(study, m, b) for m in ("tf_scm", "tf_meanflow", "tf_dcm", "ode_init") for b in (1, 2)]
    for c in configs:
        tcfg = run_setup.train_config(c)
        mcfg = run_setup.model_config(c)
        assert tcfg.block_frames in (1, 2)
        assert mcfg.mean_flow == (c.mode == "tf_meanflow")
        assert (mcfg.dim, mcfg.num_layers) == (192, 4)  # one architecture: students init from teachers
        assert mcfg.runtime.dtype == ("bfloat16" if c.mode.startswith("teacher") else "float32")
    d = configs[2]
    assert d.train.dmd_teacher_pattern == "full" and d.init.dmd_teacher == study.export("teacher_bi")
    causal = ts.dmd_config(study, "tf_scm_c2", "causal")  # the dmd_*_causal jobs' real score
    assert causal.train.dmd_teacher_pattern == "block_causal" and causal.init.dmd_teacher == study.export("teacher_c2")
    assert run_setup.train_config(causal).dmd_teacher_pattern == "block_causal"
    with pytest.raises(ValueError, match="real must be one of"):
        ts.dmd_config(study, "tf_scm_c2", "student")
    jobs = ts.all_jobs()
    assert jobs["dmd_scm_causal"].args == ("tf_scm_c2", "causal") and "teacher_bi" not in jobs["dmd_scm_causal"].deps
    assert set(ts.GROUPS["dmd_causal"]) <= set(ts.DIAGNOSTICS)  # on demand, not in the default run
    tf = ts.dmd_config(study, "tf_scm_c2", "tf")  # the dmd_*_tf jobs: teacher-forcing scores
    assert run_setup.train_config(tf).dmd_teacher_pattern == "teacher_forcing" and tf.init.dmd_teacher == study.export(
        "teacher_c2"
    )
    assert jobs["final_dmd_tf"].deps == ts.DMD_ON_DEMAND["tf"] + ("classifier",)
    assert set(ts.GROUPS["dmd_tf"]) <= set(ts.DIAGNOSTICS)
    t = configs[0]
    assert t.train.adam_b1 == 0.9 and t.train.fm_weighting == "none" and t.export_ema
    g = ts.data_config(study)
    assert g.ode.save and g.latent_shape == (8, 8, 8, 12) and g.num_samples == ts.SCALES["full"]["data_samples"]


def _write_curve(d, name, values, follow=None, step=100):
    """eval.jsonl rows: given 2 frames, trajectory error `values` and FD 10x that; from scratch,
    FD 100x and action following `follow` (default: 1 - values / 10, improving as values fall)."""
    os.makedirs(d / name, exist_ok=True)
    follow = [1 - v / 10 for v in values] if follow is None else follow
    with open(d / name / "eval.jsonl", "w") as f:
        for i, (v, a) in enumerate(zip(values, follow)):
            row = {
                "iteration": i * step,
                **{f"steps{n}": {"trajectory_error": v, "fd": 10 * v} for n in (1, 2, 4)},
                **{f"scratch{n}": {"trajectory_error": None, "fd": 100 * v, "action_following": a} for n in (1, 2, 4)},
            }
            f.write(json.dumps(row) + "\n")


def test_claim_checks_and_plots_on_a_synthetic_workdir(tmp_path):
    w = tmp_path / "w"
    _write_curve(w, "tf_dcm_c2", [9, 8, 7, 6, 5, 5])  # final (last 2) = 5
    _write_curve(w, "tf_scm_c2", [9, 6, 4.9, 4.5, 4.4, 4.3])  # reaches 5 at iteration 200 = 0.4 of 500
    _write_curve(w, "tf_dcm_c1", [9, 8, 7, 6, 5, 5])
    _write_curve(w, "tf_scm_c1", [9, 5, 4.9, 4.5, 4.4, 4.3])  # reaches at 100 = 0.2
    # (action following 1 - v/10: dCM ends at 0.5, sCM reaches 0.51 at 100, ends at 0.565)
    fin = {}
    for init, traj, drift in (("scm", 3.0, 4.0), ("dcm", 3.5, 4.5), ("ode", 3.2, 5.0), ("none", 4.0, 3.0)):
        for n in (1, 2, 4):
            fin[f"dmd_{init}/steps{n}"] = {
                "short": {"trajectory_error": traj, "action_following": 0.5, "fd": 1.0},
                "long": {"drift_by_frame": [drift] * 30, "fd": 2.0},
            }
            fin[f"dmd_{init}/scratch{n}"] = {
                "short": {"trajectory_error": None, "action_following": 0.4, "fd": 100 * traj}
            }
            fin[f"dmd_{init}_causal/steps{n}"] = {
                "short": {"trajectory_error": 5 - traj, "action_following": 0.5},
                "long": {"drift_by_frame": [drift] * 30},
            }
    for n in (1, 2, 4):  # the bidirectional teacher's weights as init: only with the causal real score
        fin[f"dmd_bidir_causal/steps{n}"] = {
            "short": {"trajectory_error": 1.5, "action_following": 0.5},
            "long": {"drift_by_frame": [9.0] * 30},
        }
    os.makedirs(w / "final_c2")
    (w / "final_c2" / "final.json").write_text(json.dumps(fin))
    for init in ("scm", "dcm", "ode", "none"):  # SF-DMD budgets, shown beside each real score
        for sfx, its in (("", 300), ("_causal", 800)):
            os.makedirs(w / f"dmd_{init}{sfx}", exist_ok=True)
            (w / f"dmd_{init}{sfx}" / "done.json").write_text(json.dumps({"iterations": its}))
    os.makedirs(w / "dmd_bidir_causal")
    (w / "dmd_bidir_causal" / "done.json").write_text(json.dumps({"iterations": 800}))
    data = rep.collect(str(w))
    c1 = {(r["pattern"], r["steps"], r["given"], r["metric"]): r for r in rep.convergence_claim(data)}
    assert {k[2:] for k in c1} == {
        ("2 frames", "trajectory_error"),
        ("2 frames", "fd"),
        ("none", "fd"),
        ("none", "action_following"),
    }
    r = c1[("c2", 2, "2 frames", "trajectory_error")]
    assert r["dcm_final"] == 5.0 and r["scm_reaches_at"] == 200 and not r["holds"]
    assert r["dcm_reaches_at"] == 400 and r["speedup"] == 2.0  # like for like: 400 / 200
    assert c1[("c1", 2, "2 frames", "trajectory_error")]["holds"] and c1[("c1", 2, "2 frames", "fd")]["fraction"] == 0.2
    assert c1[("c1", 2, "none", "fd")]["dcm_final"] == 500 and c1[("c1", 2, "none", "fd")]["holds"]
    # Action following: higher is better. TF-dCM ends at 0.5; TF-sCM reaches 0.51 >= 0.5 at iteration 100.
    r = c1[("c1", 1, "none", "action_following")]
    assert r["dcm_final"] == pytest.approx(0.5) and r["init"] == pytest.approx(0.1) and r["scm_reaches_at"] == 100
    assert r["testable"] and r["holds"] and r["scm_final"] == pytest.approx(0.565)
    # Students that only get worse than their common initialisation: the claim is not testable.
    _write_curve(w, "tf_dcm_c1", [2, 3, 3.5, 3.4, 3.5, 3.5])
    _write_curve(w, "tf_scm_c1", [2, 3.5, 3.2, 3.6, 3.9, 4.0])
    worse = {(r["pattern"], r["steps"], r["given"], r["metric"]): r for r in rep.convergence_claim(rep.collect(str(w)))}
    r = worse[("c1", 2, "2 frames", "trajectory_error")]
    assert r["init"] == 2 and not r["testable"] and r["holds"] is None and r["scm_reaches_at"] == 0
    r = worse[("c1", 2, "none", "action_following")]  # following falls from 0.8: not testable either
    assert r["init"] == pytest.approx(0.8) and not r["testable"] and r["holds"] is None
    assert c1[("c2", 2, "2 frames", "trajectory_error")]["testable"]
    _write_curve(w, "tf_dcm_c1", [9, 8, 7, 6, 5, 5])
    _write_curve(w, "tf_scm_c1", [9, 5, 4.9, 4.5, 4.4, 4.3])
    c2 = rep.init_claim(data)
    assert len(c2) == 3 and all(r["holds_traj"] and not r["holds_drift"] for r in c2)  # "none" drifts least
    assert all(r["fd_scratch"]["scm"] == 300 and r["holds_fd_scratch"] for r in c2)
    assert all("bidir" not in r["trajectory_error"] and set(r["beats_traj"]) == {"ode", "none"} for r in c2)
    assert all(r["beats_drift"] == {"ode": True, "none": False} for r in c2)
    causal = rep.init_claim(data, "_causal")  # the causal real score: sCM now worst on trajectories
    assert len(causal) == 3 and all(r["real"] == "causal teacher, block-causal" and not r["holds_traj"] for r in causal)
    # ... and the bidirectional init is a baseline there: sCM (2.0) loses to it (1.5) on trajectories and
    # beats it (4.0 < 9.0) on drift.
    assert all(r["beats_traj"] == {"ode": False, "none": False, "bidir": False} for r in causal)
    assert all(r["beats_drift"]["bidir"] and not r["holds_drift"] for r in causal)
    assert all(r["fd_scratch"]["scm"] is None and r["holds_fd_scratch"] is None for r in causal)
    # Claim 1's variants: each TF-sCM variant against TF-dCM of its seed.
    _write_curve(w, "tf_dcm_c2_seed1", [9, 8, 7, 6, 5, 5])
    _write_curve(w, "tf_scm_c2_seed1", [9, 8, 7, 6, 5.5, 4.9])  # reaches 5 at 500: does not hold
    _write_curve(w, "tf_scm_c2_nonorm", [9, 4.8, 4.5, 4.4, 4.3, 4.2])
    _write_curve(w, "tf_dcm_c1_seed1", [9, 8, 7, 6, 5, 5])  # its TF-sCM repeat not run: no pair
    assert rep.claim1_pairs(rep.collect(str(w)).get("curves")) == [
        ("c2", "", "tf_scm_c2", "tf_dcm_c2"),
        ("c2", "g not normalised", "tf_scm_c2_nonorm", "tf_dcm_c2"),
        ("c2", "seed 1", "tf_scm_c2_seed1", "tf_dcm_c2_seed1"),
        ("c1", "", "tf_scm_c1", "tf_dcm_c1"),
    ]
    rows = rep.convergence_claim(rep.collect(str(w)))
    summ = {(r["pattern"], r["variant"]): r for r in rep.claim1_summary(rows)}
    assert summ[("c2", "seed 1")]["holds"] == 0 and summ[("c2", "seed 1")]["testable"] == 12
    assert summ[("c2", "g not normalised")]["holds"] == 12
    assert summ[("c2", "")]["holds"] == sum(
        bool(r["holds"]) for r in rows if r["variant"] == "" and r["pattern"] == "c2"
    )
    assert (
        summ[("c2", "g not normalised")]["dcm_fd_scratch1"] == 500 and summ[("c2", "seed 1")]["scm_fd_scratch1"] == 520
    )
    out = tmp_path / "report"
    summary = rep.write_report(ts.Study(str(w), "full"), str(out))
    assert len(summary["claim1_summary"]) == 4
    md = (out / "study.md").read_text()
    assert "| c2 | seed 1 | TF-dCM, seed 1 | 12 | 0 |" in md and "#### TF-sCM, g not normalised" in md
    assert (out / "claim1_variants.png").stat().st_size > 1000
    assert summary["claim1"] and (out / "study.md").read_text().count("| no |") >= 1
    md = (out / "study.md").read_text()
    assert (
        "| c2 | TF-sCM (500 it) | 1 | none | - | " in md
        and "| bidirectional teacher (300 it) | 2 | FD from scratch" in md
    )
    assert (
        "| causal teacher, block-causal (800 it) | 4 | trajectory error | 2.000 | 1.500 | 1.800 | 1.000 | 1.500 "
        "| no | ODE regression, causal teacher, bidirectional teacher |"
    ) in md
    assert (
        "| bidirectional teacher (300 it) | 1 | trajectory error | 3.000 | 3.500 | 3.200 | 4.000 | - | yes | - |" in md
    )
    assert "| c2 | SF-DMD from TF-sCM, real score: causal teacher, block-causal | 1 | 2 frames | 2.000 |" in md
    assert rep.init_claim(data, "_tf") == []  # no teacher-forcing SF-DMD in this workdir
    assert "| c2 | SF-DMD from TF-sCM | 1 | 2 frames | 3.000 |" in md
    for png in (
        "convergence_trajectory_error.png",
        "convergence_fd.png",
        "convergence_fd_scratch.png",
        "drift_by_frame.png",
    ):
        assert (out / png).stat().st_size > 1000
    assert not (out / "dmd_curves.png").exists()  # no SF-DMD curves in this workdir: no empty plot


@pytest.mark.slow
def test_a_slice_of_the_study_runs_for_real_at_the_smoke_scale(tmp_path, capsys):
    study = ts.Study(str(tmp_path), "smoke")
    status = ts.schedule(study, ["tf_scm_c2"], parallel=2)
    assert set(status.values()) == {"done"}, status
    rows = [json.loads(x) for x in open(tmp_path / "tf_scm_c2" / "eval.jsonl")]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert {"steps1", "steps2", "steps4", "scratch1", "scratch2", "scratch4"} <= set(rows[-1])
    assert rows[-1]["steps2"]["fd"] >= 0 and 0 <= rows[-1]["steps2"]["action_following"] <= 1
    assert rows[-1]["scratch1"]["trajectory_error"] is None and rows[-1]["scratch1"]["fd"] >= 0
    done = json.load(open(tmp_path / "tf_scm_c2" / "done.json"))
    assert done["iterations"] == 2 and done["nan_skips"] == 0
    assert os.path.isdir(tmp_path / "tf_scm_c2" / "export")

    # A final job over it, then again: the model is kept, not evaluated again; once retrained (its
    # done.json changed), it is evaluated again.
    final = ts.Job("final_x", "final", ("tf_scm_c2", "classifier"), ((("tf_scm_c2", 2),),))
    os.makedirs(tmp_path / "final_x")
    first = ts.run_final(study, final)
    results = json.loads((tmp_path / "final_x" / "final.json").read_text())
    assert set(results) == {f"tf_scm_c2/{s}{n}" for s in ("steps", "scratch") for n in ts.STEPS}
    assert first["models"] == ["tf_scm_c2"]
    ts.run_final(study, final)
    assert json.loads((tmp_path / "final_x" / "final.json").read_text()) == results
    assert "evaluated before" in capsys.readouterr().out
    with np.load(tmp_path / "final_x" / "long_rollouts.npz") as z:
        assert "tf_scm_c2__steps1" in z.files and "truth" in z.files  # pictures carried over
    (tmp_path / "tf_scm_c2" / "done.json").write_text(json.dumps({**done, "seconds": -1}))
    ts.run_final(study, final)
    out = capsys.readouterr().out
    assert "evaluated before" not in out and "tf_scm_c2/steps1: short traj" in out  # evaluated anew
    again = json.loads((tmp_path / "final_x" / "final.json").read_text())
    assert _untimed(again) == _untimed(results)  # same weights, episodes, key
    (tmp_path / "final_x" / "final.json").write_text('{"tf_scm_c2/steps1": ')  # a cut write
    ts.run_final(study, final)
    assert "evaluating every model again" in capsys.readouterr().out
    assert _untimed(json.loads((tmp_path / "final_x" / "final.json").read_text())) == _untimed(results)


def _untimed(tree):
    """`tree` without its wall times ("seconds")."""
    if isinstance(tree, dict):
        return {k: _untimed(v) for k, v in tree.items() if k != "seconds"}
    return [_untimed(v) for v in tree] if isinstance(tree, list) else tree


def test_seed_shifts_training_seeds_and_reaches_job_commands(tmp_path):
    c = ts.dmd_config(ts.Study(str(tmp_path), "full"), "tf_scm_c2", "tf")
    study = ts.Study(str(tmp_path), "full", seed=3)
    s = ts.seeded(study, c)
    assert (s.seed, s.data.seed) == (c.seed + 3, c.data.seed + 3) and s.num_iterations == c.num_iterations
    assert ts.seeded(ts.Study(str(tmp_path), "full"), c).to_dict() == c.to_dict()  # seed 0: unchanged
    cmd = ts.job_command(study, "dmd_scm_tf")
    assert cmd[cmd.index("--seed") + 1] == "3"
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="seed"):
            ts.Study(str(tmp_path), "full", seed=bad)


def _dmd_workdir(w, seed, traj, drift):
    """A workdir with the teacher-forcing SF-DMD jobs of `seed` finished and evaluated: trajectory
    error traj[init] and a flat drift curve drift[init] at every step count."""
    fin = {}
    for init in traj:
        os.makedirs(w / f"dmd_{init}_tf")
        (w / f"dmd_{init}_tf" / "done.json").write_text(json.dumps({"iterations": 800, "seed": seed}))
        for n in (1, 2, 4):
            fin[f"dmd_{init}_tf/steps{n}"] = {
                "short": {"trajectory_error": traj[init], "action_following": 0.5},
                "long": {"drift_by_frame": [drift[init]] * 30},
            }
    os.makedirs(w / "final_dmd_tf")
    (w / "final_dmd_tf" / "final.json").write_text(json.dumps(fin))
    os.makedirs(w / "teacher_c2")  # an init copied from the seed-0 study: no seed recorded
    (w / "teacher_c2" / "done.json").write_text(json.dumps({"iterations": 6000}))


def test_claim2_over_seeds_pools_repeats_and_counts_wins(tmp_path):
    inits = ("scm", "dcm", "ode", "none", "bidir")
    _dmd_workdir(
        tmp_path / "w0", 0, dict(zip(inits, (3.0, 2.7, 4.0, 2.0, 20.0))), dict(zip(inits, (12.0, 12.5, 13, 12.5, 21)))
    )
    _dmd_workdir(
        tmp_path / "w1", 1, dict(zip(inits, (3.2, 2.7, 4.2, 2.2, 20.0))), dict(zip(inits, (12.6, 12.5, 13, 12.4, 21)))
    )
    _dmd_workdir(
        tmp_path / "w2", 2, dict(zip(inits, (3.1, 2.7, 3.0, 2.1, 20.0))), dict(zip(inits, (12.3, 12.5, 13, 12.5, 21)))
    )
    runs = {rep.dmd_seed(d): d for d in (rep.collect(str(tmp_path / w)) for w in ("w0", "w1", "w2"))}
    assert sorted(runs) == [0, 1, 2]
    rows = {(r["steps"], r["metric"]): r for r in rep.claim2_over_seeds(runs, "_tf")}
    r = rows[(1, "trajectory_error")]
    assert r["seeds"] == [0, 1, 2] and r["mean"]["scm"] == pytest.approx(3.1) and r["std"]["scm"] == pytest.approx(0.1)
    assert r["wins"] == {"ode": 2, "none": 0, "bidir": 3} and r["n"] == {"ode": 3, "none": 3, "bidir": 3}
    assert r["holds_on_mean"] == {"ode": True, "none": False, "bidir": True}
    d = rows[(4, "drift_last8")]
    assert d["wins"]["none"] == 2 and d["mean"]["none"] == pytest.approx(12.4667, abs=1e-4)
    out = tmp_path / "report"
    ts.main(
        ["--workdir", str(tmp_path / "w0"), "--report", str(out), "--repeats", f"{tmp_path / 'w1'},{tmp_path / 'w2'}"]
    )
    md = (out / "study.md").read_text()
    assert "| causal teacher, teacher forcing | 1 | trajectory error | 0,1,2 | 3.10 ± 0.10 | 2.70 ± 0.00 |" in md
    assert "| 2/3 | 0/3 | 3/3 |" in md and (out / "claim2_seeds.png").stat().st_size > 1000
    with pytest.raises(SystemExit):  # --repeats without --report
        ts.main(["--workdir", str(tmp_path / "w0"), "--repeats", str(tmp_path / "w1")])
    with pytest.raises(ValueError, match="repeats seed 0"):
        ts.main(["--workdir", str(tmp_path / "w0"), "--report", str(out), "--repeats", str(tmp_path / "w0")])
    (tmp_path / "w2" / "dmd_scm_tf" / "done.json").write_text(json.dumps({"iterations": 800, "seed": 5}))
    with pytest.raises(ValueError, match="different seeds"):
        rep.dmd_seed(rep.collect(str(tmp_path / "w2")))


def test_student_weights_choice_reaches_configs_and_job_commands(tmp_path):
    raw = ts.Study(str(tmp_path), "full", "raw")
    assert not ts.student_config(raw, "tf_scm", 2).export_ema and not ts.dmd_config(raw, "tf_scm_c2").export_ema
    assert ts.student_config(ts.Study(str(tmp_path), "full"), "tf_scm", 2).export_ema  # default: the EMA
    cmd = ts.job_command(raw, "tf_scm_c2")
    assert cmd[cmd.index("--student_weights") + 1] == "raw"
    with pytest.raises(ValueError, match="student_weights"):
        ts.Study(str(tmp_path), "full", "best")


def test_dmd_real_score_check_runs_and_its_chunk0_check_holds(tmp_path):
    """experiments/dmd_real_score_check.py on random-weight teachers of the study's model: the table
    is written and chunk 0 (no context) scores the same in both of teacher_c2's layouts."""
    from crm_jax.models.wan import functional, init_model
    from crm_jax.training import run_setup
    from experiments import dmd_real_score_check as check

    study = ts.Study(str(tmp_path), "full")
    mcfg = run_setup.model_config(study.base("teacher_tf", 2))
    for i, job in enumerate(("teacher_bi", "teacher_c2")):
        model = init_model(mcfg, i)
        run_setup.export_model(model, functional(model)[1], study.export(job))
    out = tmp_path / "check.json"
    assert (
        check.main(["--workdir", str(tmp_path), "--episodes", "2", "--times", "0.5", "--draws", "1", "--out", str(out)])
        == 0
    )
    table = json.loads(out.read_text())
    assert table["chunk0_relative_gap"] < 1e-3
    assert set(table["mse"]) == {"bi / full", "c2 / block_causal", "c2 / teacher_forcing"}
    assert len(table["mse"]["c2 / teacher_forcing"]["0.5"]) == 4  # 8 frames in chunks of 2
    with pytest.raises(FileNotFoundError, match="teacher"):
        check.main(["--workdir", str(tmp_path / "empty")])
