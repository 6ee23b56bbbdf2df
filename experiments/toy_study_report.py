"""Tables, claim checks and PNG plots of a toy-study workdir (experiments/toy_study.py --report DIR).

Reads every job's `eval.jsonl` (curves), `done.json` (wall time) and the `final_*` jobs'
`final.json` / `long_rollouts.npz`; writes `study.md`, `study.json` and plots into DIR.
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np

from experiments.toy_study import ABLATIONS, DMD_INITS, DMD_REAL, TEACHER_VARIANTS

METHODS = ("tf_scm", "tf_meanflow", "tf_dcm")
LABEL = {
    "tf_scm": "TF-sCM",
    "tf_meanflow": "TF-MeanFlow",
    "tf_dcm": "TF-dCM",
    "ode_init": "ODE regression",
    "dmd_scm": "SF-DMD from TF-sCM",
    "dmd_dcm": "SF-DMD from TF-dCM",
    "dmd_ode": "SF-DMD from ODE regression",
    "dmd_none": "SF-DMD from the causal teacher (no init)",
    "dmd_bidir": "SF-DMD from the bidirectional teacher (no init, run block-causally)",
}
REAL_LABEL = {
    "bi": "bidirectional teacher",
    "causal": "causal teacher, block-causal",  # SF-DMD's real score
    "tf": "causal teacher, teacher forcing",
}
DMD_SUFFIXES = {("" if real == "bi" else f"_{real}"): REAL_LABEL[real] for real in DMD_REAL}  # job-name suffix
LABEL.update(
    {
        f"dmd_{i}{x}": f"{LABEL[f'dmd_{i}']}, real score: {real}"
        for i in DMD_INITS
        for x, real in DMD_SUFFIXES.items()
        if x
    }
)
DMD_JOBS = [f"dmd_{i}{x}" for x in DMD_SUFFIXES for i in DMD_INITS]
LABEL.update({name: f"{LABEL[v.method]}, {v.about}" for name, v in ABLATIONS.items()})
PATTERN_NAME = {"c2": "chunk-wise (2 frames)", "c1": "frame-wise"}
GIVEN = {"steps": "2 frames", "scratch": "none"}  # students' settings: frames given to a rollout
# Claim 1 is checked on these (setting, metric) pairs; trajectory error needs given frames (the
# simulator's initial state), from scratch the distributional FD and action following remain.
CLAIM_METRICS = (("steps", "trajectory_error"), ("steps", "fd"), ("scratch", "fd"), ("scratch", "action_following"))
HIGHER_BETTER = {"action_following"}


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            rows[r["iteration"]] = r  # a resumed run may repeat an iteration: keep the last
    return [rows[k] for k in sorted(rows)]


def _json(path: str):
    return json.load(open(path)) if os.path.exists(path) else None


def curve(rows: list[dict], setting: str, metric: str) -> tuple[list[int], list[float]]:
    its, vals = [], []
    for r in rows:
        v = r.get(setting, {}).get(metric)
        if v is not None:
            its.append(r["iteration"])
            vals.append(float(v))
    return its, vals


def reach(its, vals, target: float):
    """First evaluated iteration whose value is <= target (None if never)."""
    for i, v in zip(its, vals):
        if v <= target:
            return i
    return None


def final_value(vals, n: int = 2) -> float:
    """The end of a noisy curve: mean of its last n evaluations."""
    return float(np.mean(vals[-n:]))


def collect(workdir: str) -> dict:
    jobs = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d)))
    out = {"curves": {}, "done": {}, "final": {}}
    for j in jobs:
        rows = _read_jsonl(os.path.join(workdir, j, "eval.jsonl"))
        if rows:
            out["curves"][j] = rows
        d = _json(os.path.join(workdir, j, "done.json"))
        if d:
            out["done"][j] = d
        m = _read_jsonl(os.path.join(workdir, j, "metrics.jsonl"))
        if m and j not in out["done"]:  # a cut run: how far it got
            out["done"][j] = {"iterations": f"{m[-1]['iteration']} (stopped)"}
        f = _json(os.path.join(workdir, j, "final.json"))
        if f:
            out["final"].update(f)
    return out


def claim1_pairs(curves: dict) -> list[tuple[str, str, str, str]]:
    """(pattern, variant, TF-sCM job, TF-dCM job) with curves: per pattern TF-sCM against TF-dCM
    (variant ""), then each TF-sCM ablation (`ABLATIONS`) against TF-dCM of the same seed: the
    seed-1 repeat against TF-dCM's seed-1 repeat, the others against TF-dCM."""
    pairs = []
    for sfx in ("c2", "c1"):
        pairs.append((sfx, "", f"tf_scm_{sfx}", f"tf_dcm_{sfx}"))
        repeats = {v.train: name for name, v in ABLATIONS.items() if v.method == "tf_dcm" and v.suffix == sfx}
        for name, v in ABLATIONS.items():
            if v.method == "tf_scm" and v.suffix == sfx:  # a seed repeat has a TF-dCM twin of the same train
                pairs.append((sfx, v.about, name, repeats.get(v.train, f"tf_dcm_{sfx}")))
    return [p for p in pairs if curves.get(p[2]) and curves.get(p[3])]


def convergence_claim(data: dict) -> list[dict]:
    """Claim 1: TF-sCM reaches TF-dCM's final quality in <= 1/3 of the steps (per pattern, step count,
    frames given, metric: `CLAIM_METRICS`; and per `claim1_pairs` variant, `variant` "" = the
    recipe). TF-dCM's final quality = mean of its last two evaluations; "reaching" it = being at
    least as good (lower, or higher for `HIGHER_BETTER` metrics).
    `dcm_reaches_at`: where TF-dCM itself first got there; a TF-dCM curve that is flat after its
    first evaluations makes the 1/3 test easy, so `speedup` = dcm_reaches_at / scm_reaches_at is
    the like-for-like ratio (the paper's ~10x).

    The claim is about how fast distillation *improves* a student, so it is only testable where
    TF-dCM ends better than both students start (iteration 0, the initialisation; the students start
    from the same teacher weights): otherwise "reaching" TF-dCM's final quality says nothing, and
    `holds` is None with `testable` False."""
    rows = []
    for sfx, variant, scm_job, dcm_job in claim1_pairs(data["curves"]):
        scm, dcm = data["curves"][scm_job], data["curves"][dcm_job]
        for n in (1, 2, 4):
            for given, metric in CLAIM_METRICS:
                sign = -1.0 if metric in HIGHER_BETTER else 1.0  # oriented: lower is better
                di, dv = curve(dcm, f"{given}{n}", metric)
                si, sv = curve(scm, f"{given}{n}", metric)
                if not dv or not sv:
                    continue
                dv, sv = [sign * v for v in dv], [sign * v for v in sv]
                target = final_value(dv)
                start = max(dv[0], sv[0]) if di[0] == si[0] == 0 else None
                testable = start is None or target < start
                hit, own = reach(si, sv, target), reach(di, dv, target)
                total = di[-1]
                rows.append(
                    dict(
                        pattern=sfx,
                        variant=variant,
                        scm_job=scm_job,
                        dcm_job=dcm_job,
                        steps=n,
                        given=GIVEN[given],
                        metric=metric,
                        init=None if start is None else sign * start,
                        dcm_final=sign * target,
                        dcm_iterations=total,
                        dcm_reaches_at=own,
                        speedup=own / hit if hit and own is not None else None,
                        scm_final=sign * final_value(sv),
                        scm_reaches_at=hit,
                        fraction=None if hit is None else hit / total,
                        testable=testable,
                        holds=(hit is not None and hit <= total / 3) if testable else None,
                    )
                )
    return rows


def claim1_summary(rows: list[dict]) -> list[dict]:
    """Claim 1 per (pattern, variant): how many of its testable checks hold, the median like-for-like
    speed-up over them, and both methods' final FD from scratch at 1 step (the metric that moves most)."""
    out = []
    for key, group in itertools.groupby(rows, key=lambda r: (r["pattern"], r["variant"])):
        group = list(group)
        tested = [r for r in group if r["holds"] is not None]
        speed = [r["speedup"] for r in tested if r.get("speedup") is not None]
        fd1 = next((r for r in group if (r["steps"], r["given"], r["metric"]) == (1, "none", "fd")), {})
        out.append(
            dict(
                pattern=key[0],
                variant=key[1],
                scm_job=group[0]["scm_job"],
                dcm_job=group[0]["dcm_job"],
                testable=len(tested),
                holds=sum(bool(r["holds"]) for r in tested),
                median_speedup=float(np.median(speed)) if speed else None,
                scm_fd_scratch1=fd1.get("scm_final"),
                dcm_fd_scratch1=fd1.get("dcm_final"),
            )
        )
    return out


def _long_drift(final: dict, tag: str, tail: int = 8):
    r = final.get(tag, {}).get("long")
    if not r or r.get("drift_by_frame") is None:
        return None
    return float(np.mean(r["drift_by_frame"][-tail:]))


CLAIM2_NEEDED = ("scm", "dcm", "ode", "none")  # SF-DMD inits a claim-2 row needs evaluated
CLAIM2_BASELINES = {
    "ode": "ODE regression",
    "none": "causal teacher",  # what TF-sCM's SF-DMD must
    "bidir": "bidirectional teacher",
}  # match (those evaluated)


def init_claim(data: dict, suffix: str = "") -> list[dict]:
    """Claim 2: SF-DMD from TF-sCM is at least as good as from ODE regression and from no init
    (the causal teacher's weights; and the bidirectional teacher's, where evaluated), on trajectory
    error (short rollouts) and drift (mean of the last 8 frames of long rollouts). `beats_traj` /
    `beats_drift`: the verdict against each baseline. Also reported, not part of the claim: the FD
    from scratch (`fd_scratch`, None if not evaluated), what distribution matching is for.
    `suffix`: a `DMD_SUFFIXES` key (which real score). Inits not evaluated are absent from the dicts."""
    fin, rows = data["final"], []
    for n in (1, 2, 4):
        tags = {i: f"dmd_{i}{suffix}/steps{n}" for i in DMD_INITS if f"dmd_{i}{suffix}/steps{n}" in fin}
        if not set(CLAIM2_NEEDED) <= set(tags):
            continue
        base = [o for o in CLAIM2_BASELINES if o in tags]
        traj = {i: fin[t]["short"]["trajectory_error"] for i, t in tags.items()}
        drift = {i: _long_drift(fin, t) for i, t in tags.items()}
        fd0 = {i: fin.get(f"dmd_{i}{suffix}/scratch{n}", {}).get("short", {}).get("fd") for i in tags}
        its = sorted({str(data["done"].get(f"dmd_{i}{suffix}", {}).get("iterations", "?")) for i in tags})
        beats_traj = {o: traj["scm"] <= traj[o] for o in base}
        beats_drift = {o: drift["scm"] <= drift[o] for o in base}
        rows.append(
            dict(
                steps=n,
                real=DMD_SUFFIXES[suffix],
                iterations="/".join(its),
                trajectory_error=traj,
                drift_last8=drift,
                fd_scratch=fd0,
                beats_traj=beats_traj,
                beats_drift=beats_drift,
                holds_traj=all(beats_traj.values()),
                holds_drift=all(beats_drift.values()),
                holds_fd_scratch=(all(fd0["scm"] <= fd0[o] for o in base) if None not in fd0.values() else None),
            )
        )
    return rows


def dmd_seed(data: dict) -> int:
    """The study seed (`--seed`) a workdir's SF-DMD jobs ran with (done.json; 0 before it was recorded;
    their inits may come from another seed's workdir). Raises if they disagree."""
    seeds = {d.get("seed", 0) for j, d in data["done"].items() if j.startswith("dmd_") and "iterations" in d}
    if len(seeds) > 1:
        raise ValueError(f"SF-DMD jobs of one workdir ran with different seeds {sorted(seeds)}")
    return seeds.pop() if seeds else 0


def claim2_over_seeds(runs: dict[int, dict], suffix: str) -> list[dict]:
    """Claim 2 repeated over seeds (`runs`: seed -> `collect` of a workdir of that seed; SF-DMD of the
    real score `suffix` from the same inits). Per step count and metric (trajectory error, drift):
    each init's values by seed, mean and standard deviation (ddof 1) over the seeds where every init
    in `CLAIM2_NEEDED` was evaluated, and per baseline the seeds where SF-DMD from TF-sCM is at least
    as good (`wins`, of `n`) and whether it is on the mean (`holds_on_mean`)."""
    per_seed = {seed: {r["steps"]: r for r in init_claim(data, suffix)} for seed, data in sorted(runs.items())}
    rows = []
    for n in (1, 2, 4):
        seeds = [s for s, r in per_seed.items() if n in r]
        if not seeds:
            continue
        for metric in ("trajectory_error", "drift_last8"):
            values = {}
            for s in seeds:
                for init, v in per_seed[s][n][metric].items():
                    if v is not None:
                        values.setdefault(init, {})[s] = float(v)
            base = [o for o in CLAIM2_BASELINES if o in values]
            both = {o: [s for s in seeds if s in values[o] and s in values["scm"]] for o in base}
            mean = {i: float(np.mean(list(v.values()))) for i, v in values.items()}
            std = {i: float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else None for i, v in values.items()}
            rows.append(
                dict(
                    steps=n,
                    metric=metric,
                    real=DMD_SUFFIXES[suffix],
                    seeds=seeds,
                    values=values,
                    mean=mean,
                    std=std,
                    n={o: len(both[o]) for o in base},
                    wins={o: sum(values["scm"][s] <= values[o][s] for s in both[o]) for o in base},
                    holds_on_mean={o: mean["scm"] <= mean[o] for o in base},
                )
            )
    return rows


def _label(name: str) -> str:
    """Display name of a job: its own LABEL, else its method's (`tf_scm_c2` -> TF-sCM)."""
    return LABEL.get(name, LABEL.get(name.rsplit("_", 1)[0], name))


def _best(its, vals, nd):
    """`value (iteration)` of the lowest value after the first evaluation."""
    k = 1 + int(np.argmin(vals[1:]))
    return f"{_fmt(vals[k], nd)} ({its[k]})"


def _fmt(v, nd=3):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


CLAIM1_HEADER = (
    "| pattern | steps | frames given | metric | init | TF-dCM final (its last 2 evals) | TF-sCM final "
    "| TF-sCM reaches it at | of TF-dCM's iterations | holds | TF-dCM first reaches it at | speed-up |",
    "|---" * 12 + "|",
)


def markdown(data: dict, claims1, claims2) -> str:
    fin, done = data["final"], data["done"]
    L = ["# Toy study (experiments/toy_study.py)", ""]
    clf = done.get("classifier")
    if clf:
        acc = ", ".join(f"{k} {v:.3f}" for k, v in clf["heldout_accuracy"].items())
        L += [f"Video classifier (Fréchet-distance features): held-out accuracy {acc}; {clf['seconds']} s.", ""]
    L += [
        "## Teacher training (FD of held-out rollouts of the EMA during training)",
        "",
        "| job | iteration | clips seen | FD |",
        "|---|---|---|---|",
    ]
    for j in sorted(k for k in data["curves"] if k.startswith("teacher")):
        batch = data["done"].get(j, {}).get("batch_size") or data.get("teacher_batch", {}).get(j)
        for r in data["curves"][j]:
            e = r.get("euler", {})
            seen = "-" if batch is None else f"{r['iteration'] * batch / 1e6:.2f}M"
            if e.get("fd") is not None:
                L.append(f"| {j} | {r['iteration']} | {seen} | {_fmt(e.get('fd'), 1)} |")
    L += [
        "",
        "(Trajectory error and action following during training are in each job's eval.jsonl; "
        "they depend on the detector version, the FD does not.)",
    ]
    L += [
        "",
        "## Teachers (final exports, more episodes; long = 32-frame rollouts with a sliding window)",
        "",
        "| teacher | trajectory error (px) | action following | FD | drift, last 8 of 32 (px) | FD, last 8 of 32 "
        "| from scratch: action following | from scratch: FD | iterations | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted({k.split("/")[0] for k in fin if k.startswith("teacher")}):
        r = fin.get(f"{t}/euler", {}).get("short")
        if r:
            lg = fin[f"{t}/euler"].get("long") or {}
            sc = fin.get(f"{t}/euler_scratch", {}).get("short") or {}
            L.append(
                f"| {t} | {_fmt(r['trajectory_error'])} | {_fmt(r['action_following'])} | {_fmt(r.get('fd'), 1)} "
                f"| {_fmt(_long_drift(fin, f'{t}/euler'))} | {_fmt(lg.get('fd'), 1)} "
                f"| {_fmt(sc.get('action_following'))} | {_fmt(sc.get('fd'), 1)} "
                f"| {done.get(t, {}).get('iterations', '-')} | {done.get(t, {}).get('seconds', '-')} |"
            )
    L += [
        "",
        "Ground truth scores 0 px / 1.000. The bidirectional teacher generates whole clips (no given "
        "frames), so only its action following and FD are defined. From scratch = a causal teacher "
        "given no frame either (only the prompt and the actions).",
        "",
    ]
    L += [
        "## Distilled students: final quality (short rollouts; long: 32 frames, 2 given)",
        "",
        "Frames given: 2 (the first chunk of the episode) or none (from scratch: trajectory error "
        "and drift are undefined, the simulator's initial state being unknown to the model).",
        "",
        "| pattern | student | steps | frames given | trajectory error (px) | action following | FD | drift, last 8 of 32 frames (px) | FD, last 8 of 32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sfx in ("c2", "c1"):
        names = [f"{m}_{sfx}" for m in METHODS] + (["ode_init_c2"] + DMD_JOBS if sfx == "c2" else [])
        for name in names:
            for given in GIVEN:
                for n in (1, 2, 4):
                    r = fin.get(f"{name}/{given}{n}")
                    if not r:
                        continue
                    s, lg = r["short"], r.get("long") or {}
                    label = _label(name)
                    L.append(
                        f"| {sfx} | {label} | {n} | {GIVEN[given]} | {_fmt(s['trajectory_error'])} | "
                        f"{_fmt(s['action_following'])} | {_fmt(s.get('fd'), 2)} | "
                        f"{_fmt(_long_drift(fin, f'{name}/{given}{n}'))} | {_fmt(lg.get('fd'), 2)} |"
                    )
    if L[-1].startswith("|---"):
        L.append("| (no students evaluated yet) | | | | | | | | |")
    L += [
        "",
        "## Distilled students during training (the training-time evaluations)",
        "",
        "Iteration 0 is the initialisation (the causal teacher's weights, sampled with the student's "
        "few-step consistency sampler; TF-MeanFlow's interval embedding starts at zero).",
        "",
        "Best = the best evaluation after the initialisation (its iteration in brackets).",
        "",
        "| pattern | student | steps | frames given | trajectory error (px): init / best / final "
        "| action following: init / final | FD: init / best / final |",
        "|---|---|---|---|---|---|---|",
    ]
    for sfx in ("c2", "c1"):
        names = (
            [f"{m}_{sfx}" for m in METHODS]
            + [a for a, v in ABLATIONS.items() if v.suffix == sfx]
            + (["ode_init_c2"] + DMD_JOBS if sfx == "c2" else [])
        )
        for name in names:
            rows = data["curves"].get(name)
            if not rows or rows[-1]["iteration"] == 0:  # not trained (yet): only its initialisation
                continue
            label = _label(name)
            for given in GIVEN:
                for n in (1, 2, 4):
                    ti, tv = curve(rows, f"{given}{n}", "trajectory_error")
                    _, av = curve(rows, f"{given}{n}", "action_following")
                    fi, fv = curve(rows, f"{given}{n}", "fd")
                    if len(tv) < 2 and len(fv) < 2:
                        continue
                    traj = f"{_fmt(tv[0], 2)} / {_best(ti, tv, 2)} / {_fmt(tv[-1], 2)}" if len(tv) > 1 else "-"
                    fd = f"{_fmt(fv[0], 1)} / {_best(fi, fv, 1)} / {_fmt(fv[-1], 1)}" if len(fv) > 1 else "-"
                    follow = f"{_fmt(av[0], 2)} / {_fmt(av[-1], 2)}" if av else "-"
                    L.append(
                        f"| {sfx} | {label} ({rows[-1]['iteration']} it) | {n} | {GIVEN[given]} | {traj} | "
                        f"{follow} | {fd} |"
                    )
    L += [
        "",
        "## Claim 1: TF-sCM reaches TF-dCM's final quality in at most a third of the steps",
        "",
        "Testable only where TF-dCM ends better than the students' common initialisation. Action "
        'following: higher is better ("reaches" = at least as high).',
        "",
        "TF-dCM first reaches = where TF-dCM itself first got to its final quality; speed-up = that / "
        "where TF-sCM got there (the paper reports about 10).",
        "",
        *CLAIM1_HEADER,
    ]

    def claim1_row(r):
        verdict = "not testable" if r.get("holds") is None else ("yes" if r["holds"] else "no")
        speed = "-" if r.get("speedup") is None or r.get("holds") is None else f"{r['speedup']:.1f}x"
        return (
            f"| {r['pattern']} | {r['steps']} | {r.get('given', '2 frames')} | {r['metric']} | {_fmt(r.get('init'))} | "
            f"{_fmt(r['dcm_final'])} | {_fmt(r['scm_final'])} | {_fmt(r['scm_reaches_at'])} | {_fmt(r['fraction'], 2)} | {verdict} "
            f"| {_fmt(r.get('dcm_reaches_at'))} | {speed} |"
        )

    L += [claim1_row(r) for r in claims1 if not r.get("variant")]
    if not claims1:
        L.append("| (not run yet) | | | | | | | | | | | |")
    summary = claim1_summary(claims1)
    if any(r["variant"] for r in summary):
        L += [
            "",
            "### Claim 1 by variant (why, and how much a second seed moves it)",
            "",
            "Each TF-sCM variant against TF-dCM of the same seed; checks = the rows of the table above "
            "(3 step counts x 4 metrics) where the claim is testable; speed-up = median like-for-like "
            "ratio over them.",
            "",
            "| pattern | TF-sCM variant | against | testable checks | hold (<= 1/3) | median speed-up "
            "| FD from scratch, 1 step: TF-sCM final | TF-dCM final |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in summary:
            speed = "-" if r["median_speedup"] is None else f"{r['median_speedup']:.1f}x"
            L.append(
                f"| {r['pattern']} | {r['variant'] or 'the recipe'} | {_label(r['dcm_job'])} | {r['testable']} "
                f"| {r['holds']} | {speed} | {_fmt(r['scm_fd_scratch1'], 1)} | {_fmt(r['dcm_fd_scratch1'], 1)} |"
            )
        for variant in dict.fromkeys(r["variant"] for r in claims1 if r["variant"]):
            L += ["", f"#### TF-sCM, {variant}", "", *CLAIM1_HEADER]
            L += [claim1_row(r) for r in claims1 if r["variant"] == variant]
    L += [
        "",
        "## Claim 2: SF-DMD from TF-sCM is at least as good as from ODE regression and from no init",
        "",
        "Real score = the teacher whose CFG score SF-DMD matches (it also initialises the critic).",
        "",
        "No init = SF-DMD straight from a teacher's weights: the causal teacher's (the TF students' teacher), "
        "or the bidirectional teacher's run block-causally (the paper's no-init baseline; '-' where not run). "
        "Not beaten = the baselines TF-sCM's SF-DMD is worse than.",
        "",
        "| real score | steps | metric | from TF-sCM | from TF-dCM | from ODE regression | no init: causal teacher "
        "| no init: bidirectional teacher | holds | not beaten |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in claims2:
        for m, key, ok, beats in (
            ("trajectory error", "trajectory_error", r["holds_traj"], r.get("beats_traj")),
            ("drift, last 8 of 32", "drift_last8", r["holds_drift"], r.get("beats_drift")),
            ("FD from scratch (not part of the claim)", "fd_scratch", r.get("holds_fd_scratch"), None),
        ):
            v = r.get(key)
            if not v or None in v.values():
                continue
            verdict = "yes" if ok else "no"
            lost = ", ".join(CLAIM2_BASELINES[o] for o, b in (beats or {}).items() if not b) or "-"
            L.append(
                f"| {r.get('real', DMD_SUFFIXES[''])} ({r.get('iterations', '?')} it) | {r['steps']} | {m} | {_fmt(v['scm'])} | {_fmt(v['dcm'])} | {_fmt(v['ode'])} | {_fmt(v['none'])} | "
                f"{_fmt(v.get('bidir'))} | {verdict} | {lost} |"
            )
    if not claims2:
        L.append("| (not run yet) | | | | | | | | | |")
    L += ["", "## Wall times (s; GPU jobs share one GPU)", "", "| job | s | iterations |", "|---|---|---|"]
    for j, d in sorted(done.items()):
        L.append(f"| {j} | {d.get('seconds', '-')} | {d.get('iterations', '-')} |")
    return "\n".join(L) + "\n"


def _save(fig, path: str, rect=None) -> str:
    """Lay out (leaving `rect`'s margins, e.g. for legends below the axes), write and close `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _variant_styles(sfx: str) -> dict[str, dict]:
    """Claim 1's curves of pattern `sfx`: TF-dCM red, TF-sCM blue (their seed repeats dashed), each
    other TF-sCM ablation its own colour, dotted."""
    styles = {f"tf_dcm_{sfx}": dict(color="C3", ls="-"), f"tf_scm_{sfx}": dict(color="C0", ls="-")}
    others = iter(("C1", "C2", "C4", "C5", "C6", "C7"))
    for name, v in ABLATIONS.items():
        if v.suffix == sfx:
            seeded = "seed" in dict(v.train)
            styles[name] = (
                dict(color="C3" if v.method == "tf_dcm" else "C0", ls="--")
                if seeded
                else dict(color=next(others), ls=":")
            )
    return styles


def _variant_plot(plt, curves: dict, out: str) -> list[str]:
    """claim1_variants.png: rows = pattern, columns = FD from scratch at 1/2/4 steps and trajectory
    error at 1 step; every claim-1 variant with curves (nothing written if no variant has any)."""
    if not any(curves.get(a) for a in ABLATIONS):
        return []
    panels = [("scratch", n, "fd", f"FD from scratch, {n} step{'s' * (n > 1)} (log)") for n in (1, 2, 4)]
    panels.append(("steps", 1, "trajectory_error", "trajectory error, 2 frames given, 1 step (px)"))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), squeeze=False)
    for row, sfx in enumerate(("c2", "c1")):
        for ax, (given, n, metric, ylabel) in zip(axes[row], panels):
            for name, style in _variant_styles(sfx).items():
                its, vals = curve(curves.get(name, []), f"{given}{n}", metric)
                if its:
                    ax.plot(its, vals, marker=".", label=_label(name), **style)
            if given == "scratch" and ax.lines:
                ax.set_yscale("log")
            ax.set_title(PATTERN_NAME[sfx], fontsize=10)
            ax.set_xlabel("training iteration")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    handles = {}
    for ax in axes.flat:
        for line in ax.lines:
            handles.setdefault(line.get_label(), line)
    fig.legend(handles=list(handles.values()), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Claim 1: TF-sCM's variants against TF-dCM (dashed: the seed-1 repeats)")
    return [_save(fig, os.path.join(out, "claim1_variants.png"), rect=(0, 0.07, 1, 1))]


def plots(data: dict, out: str, workdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    curves = data["curves"]
    styles = {"tf_scm": ("C0", "-"), "tf_meanflow": ("C2", "-"), "tf_dcm": ("C3", "-"), "ode_init": ("C4", "-")}
    for given, metric, ylabel, png in (
        ("steps", "trajectory_error", "trajectory error (px)", "convergence_trajectory_error.png"),
        ("steps", "fd", "Fréchet distance", "convergence_fd.png"),
        ("scratch", "fd", "Fréchet distance, from scratch (log)", "convergence_fd_scratch.png"),
    ):
        fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex="row", squeeze=False)
        for row, sfx in enumerate(("c2", "c1")):
            for col, n in enumerate((1, 2, 4)):
                ax = axes[row, col]
                for name, rows in curves.items():
                    base = name.rsplit("_", 1)[0]
                    if base not in styles or not name.endswith(f"_{sfx}"):
                        continue
                    its, vals = curve(rows, f"{given}{n}", metric)
                    if its:
                        c, ls = styles[base]
                        ax.plot(its, vals, color=c, ls=ls, marker=".", label=LABEL.get(base, base))
                if given == "scratch" and ax.lines:
                    ax.set_yscale("log")
                ax.set_title(f"{PATTERN_NAME[sfx]}, {n} step{'s' if n > 1 else ''} per chunk, {GIVEN[given]} given")
                ax.set_xlabel("training iteration")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
        if not any(ax.lines for ax in axes.flat):
            plt.close(fig)
            continue
        axes[0, 0].legend(fontsize=8)
        files.append(_save(fig, os.path.join(out, png)))

    files += _variant_plot(plt, curves, out)

    # SF-DMD curves: colour = initialisation, line style = real score (two legends below the plots);
    # log scale, so inits that start an order of magnitude worse do not flatten the others.
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5), squeeze=False)
    styles = dict(zip(DMD_SUFFIXES, ("-", "--", ":")))
    seen_inits, seen_reals = {}, {}
    for row, (given, metric, ylabel) in enumerate(
        (
            ("steps", "trajectory_error", "trajectory error (px, log)"),
            ("scratch", "fd", "Fréchet distance from scratch (log)"),
        )
    ):
        for col, n in enumerate((1, 2, 4)):
            ax = axes[row, col]
            for (i, init), sfx in itertools.product(enumerate(DMD_INITS), DMD_SUFFIXES):
                its, vals = curve(curves.get(f"dmd_{init}{sfx}", []), f"{given}{n}", metric)
                if len(its) > 1:
                    ax.plot(its, vals, marker=".", ls=styles[sfx], color=f"C{i}")
                    seen_inits[init], seen_reals[sfx] = f"C{i}", styles[sfx]
            ax.set_yscale("log")
            ax.set_title(f"{n} step{'s' if n > 1 else ''} per chunk, {GIVEN[given]} given", fontsize=10)
            ax.set_xlabel("SF-DMD iteration (student + critic steps)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
    if any(ax.lines for ax in axes.flat):
        from matplotlib.lines import Line2D

        inits = [
            Line2D([], [], color=col, marker=".", label=LABEL[f"dmd_{i}"].removeprefix("SF-DMD "))
            for i, col in seen_inits.items()
        ]
        reals = [
            Line2D([], [], color="k", ls=ls, label=f"real score: {DMD_SUFFIXES[x]}") for x, ls in seen_reals.items()
        ]
        fig.legend(handles=inits, loc="lower left", fontsize=8, title="initialisation", frameon=False)
        fig.legend(handles=reals, loc="lower right", fontsize=8, title="SF-DMD's real score", frameon=False)
        fig.suptitle("SF-DMD from each initialisation")
        files.append(_save(fig, os.path.join(out, "dmd_curves.png"), rect=(0, 0.13, 1, 1)))
    else:
        plt.close(fig)

    teachers = sorted(k for k in curves if k.startswith("teacher"))
    if teachers:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, j in enumerate(teachers):
            its, vals = curve(curves[j], "euler", "fd")
            batch = data["done"].get(j, {}).get("batch_size") or data.get("teacher_batch", {}).get(j, 1)
            if its:
                ax.plot(np.asarray(its) * batch / 1e6, vals, marker="o", color=f"C{i}", label=j)
        ax.set_yscale("log")
        ax.set_xlabel("training clips seen (millions)")
        ax.set_ylabel("Fréchet distance of rollouts (log)")
        ax.set_title("teacher training: held-out rollouts of the EMA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files.append(_save(fig, os.path.join(out, "teacher_curves.png")))

    # Drift: chunk-wise students, chunk-wise after SF-DMD (colour = init, style = real score, as in
    # dmd_curves.png; the causal teacher in grey for reference), frame-wise students.
    fin = data["final"]
    styles = dict(zip(DMD_SUFFIXES, ("-", "--", ":")))
    panels = [
        (
            "c2",
            "chunk-wise (2 frames), distilled",
            [("teacher_c2/euler", {})]
            + [(f"{m}_c2/steps2", {}) for m in METHODS]
            + [(f"{v}/euler", {}) for v in TEACHER_VARIANTS]
            + [("ode_init_c2/steps2", {})],
        ),
        (
            "c2",
            "chunk-wise (2 frames), after SF-DMD (2 steps)",
            [("teacher_c2/euler", dict(color="0.6", lw=2))]
            + [
                (f"dmd_{init}{x}/steps2", dict(color=f"C{i}", ls=styles[x]))
                for x in DMD_SUFFIXES
                for i, init in enumerate(DMD_INITS)
            ],
        ),
        (
            "c1",
            "frame-wise (1 frame), distilled",
            [("teacher_c1/euler", {})] + [(f"{m}_c1/steps2", {}) for m in METHODS],
        ),
    ]
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), squeeze=False)
    for ax, (_, title, lines) in zip(axes[0], panels):
        dmd_inits, dmd_reals = {}, {}
        for i, (tag, style) in enumerate(lines):
            r = fin.get(tag, {}).get("long")
            if not (r and r.get("drift_by_frame")):
                continue
            d, (name, setting) = r["drift_by_frame"], tag.split("/")
            label = f"{_label(name)} ({'Euler' if setting == 'euler' else '2 steps'})"
            if name.startswith("dmd_"):  # one legend entry per init and per real score, below
                init = name.split("_")[1]
                dmd_inits[init] = Line2D(
                    [], [], color=style["color"], label=_label(f"dmd_{init}").removeprefix("SF-DMD ")
                )
                x = name[len(f"dmd_{init}") :]
                dmd_reals[x] = Line2D([], [], color="k", ls=style["ls"], label=f"real score: {DMD_SUFFIXES[x]}")
                label = None
            ax.plot(np.arange(len(d)) + 2, d, **({"color": f"C{i % 10}"} | style), label=label)
        if not ax.lines:
            ax.set_visible(False)
            continue
        ax.axvline(8, color="k", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("frame index (dotted: the trained length)")
        ax.set_ylabel("mean sprite-centre error (px)")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + list(dmd_inits.values()) + list(dmd_reals.values())
        ax.legend(handles=handles, fontsize=7)
    fig.suptitle("Drift over 4x-length rollouts, 2 frames given")
    files.append(_save(fig, os.path.join(out, "drift_by_frame.png")))

    npz = next(
        (
            p
            for p in (os.path.join(workdir, j, "long_rollouts.npz") for j in ("final_c2", "final_teachers"))
            if os.path.exists(p)
        ),
        None,
    )
    if npz:
        z = np.load(npz)
        shown = (
            ("teacher_c2__euler", "teacher_c1__euler")
            + tuple(f"{v}__euler" for v in TEACHER_VARIANTS)
            + ("tf_scm_c2__steps2", "tf_dcm_c2__steps2", "ode_init_c2__steps2", "dmd_scm__steps2", "dmd_none__steps2")
        )
        keys = ["truth"] + [k for k in shown if k in z]
        frames = [z[k][0] for k in keys]  # [T, H, W, 3] each, episode 0
        t = frames[0].shape[0]
        pick = np.linspace(0, t - 1, min(t, 16)).astype(int)
        strip = np.concatenate([np.concatenate([f[i] for i in pick], 1) for f in frames], 0)
        fig, ax = plt.subplots(figsize=(16, 1.1 * len(keys)))
        ax.imshow(np.clip(strip, 0, 1), interpolation="nearest")
        ax.set_yticks([(i + 0.5) * frames[0].shape[1] for i in range(len(keys))])
        ax.set_yticklabels([k.replace("__", " ") for k in keys], fontsize=8)
        ax.set_xticks([(j + 0.5) * frames[0].shape[2] for j in range(len(pick))])
        ax.set_xticklabels([str(i) for i in pick], fontsize=7)
        ax.set_xlabel("frame index (2 given, then generated from actions; sliding window past frame 8)")
        files.append(_save(fig, os.path.join(out, "long_rollouts.png")))
    return files


def seeds_markdown(rows: list[dict]) -> str:
    """Claim 2 over seeds as a markdown section (`claim2_over_seeds` rows)."""
    inits = [i for i in DMD_INITS if any(i in r["mean"] for r in rows)]
    L = [
        "## Claim 2 over seeds",
        "",
        "SF-DMD from the same inits, repeated with `--seed N` (training seeds shifted, evaluation fixed); "
        "mean ± standard deviation over the seeds (px). Wins = seeds where SF-DMD from TF-sCM is at least as "
        "good as from that baseline.",
        "",
        "| real score | steps | metric | seeds | "
        + " | ".join(LABEL[f"dmd_{i}"].removeprefix("SF-DMD ") for i in inits)
        + " | "
        + " | ".join(f"wins vs {b}" for b in CLAIM2_BASELINES.values())
        + " |",
        "|---" * (4 + len(inits) + len(CLAIM2_BASELINES)) + "|",
    ]
    for r in rows:
        cells = [
            (
                "-"
                if i not in r["mean"]
                else f"{r['mean'][i]:.2f}" + ("" if r["std"].get(i) is None else f" ± {r['std'][i]:.2f}")
            )
            for i in inits
        ]
        wins = [f"{r['wins'][o]}/{r['n'][o]}" if o in r["wins"] else "-" for o in CLAIM2_BASELINES]
        metric = {"trajectory_error": "trajectory error", "drift_last8": "drift, last 8 of 32"}[r["metric"]]
        L.append(
            f"| {r['real']} | {r['steps']} | {metric} | {','.join(map(str, r['seeds']))} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(wins)
            + " |"
        )
    return "\n".join(L) + "\n"


def _seeds_plot(rows: list[dict], out: str) -> list[str]:
    """claim2_seeds.png: per step count (columns) and metric (rows), each init's value at every seed
    (dots) and its mean ± std (bar), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not rows:
        return []
    reals = sorted({r["real"] for r in rows})
    files = []
    for real in reals:
        fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), squeeze=False)
        for r in (r for r in rows if r["real"] == real):
            ax = axes[("trajectory_error", "drift_last8").index(r["metric"]), (1, 2, 4).index(r["steps"])]
            for k, init in enumerate(i for i in DMD_INITS if i in r["values"]):
                vals = list(r["values"][init].values())
                ax.errorbar(
                    [k], [r["mean"][init]], yerr=[r["std"][init] or 0.0], fmt="s", color=f"C{k}", capsize=4, ms=7
                )
                ax.plot([k + 0.15] * len(vals), vals, ".", color=f"C{k}", alpha=0.6)
            inits = [i for i in DMD_INITS if i in r["values"]]
            ax.set_xticks(range(len(inits)))
            ax.set_xticklabels(
                [LABEL[f"dmd_{i}"].removeprefix("SF-DMD from ").split(" (")[0] for i in inits], rotation=20, fontsize=8
            )
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(
                f"{r['steps']} step{'s' * (r['steps'] > 1)} per chunk, seeds {','.join(map(str, r['seeds']))}",
                fontsize=10,
            )
            ax.set_ylabel(
                {
                    "trajectory_error": "trajectory error (px, log)",
                    "drift_last8": "drift, last 8 of 32 frames (px, log)",
                }[r["metric"]]
            )
            ax.grid(alpha=0.3, which="both", axis="y")
        fig.suptitle(f"SF-DMD from each initialisation over seeds (real score: {real}); squares: mean ± std")
        name = "claim2_seeds.png" if len(reals) == 1 else f"claim2_seeds_{real.replace(' ', '_').replace(',', '')}.png"
        files.append(_save(fig, os.path.join(out, name)))
    return files


def write_report(study, out: str, repeats: tuple[str, ...] = ()) -> dict:
    """Report of `study.workdir` into `out`; `repeats`: workdirs of the same study at other seeds
    (`--seed N`), whose SF-DMD results are pooled with this one's in "Claim 2 over seeds"."""
    os.makedirs(out, exist_ok=True)
    data = collect(study.workdir)
    data["teacher_batch"] = {
        j: dict(v).get("batch_size", study.S["teacher_batch"])
        for j, v in {**{t: {} for t in ("teacher_bi", "teacher_c2", "teacher_c1")}, **TEACHER_VARIANTS}.items()
    }
    c1, c2 = convergence_claim(data), [r for x in DMD_SUFFIXES for r in init_claim(data, x)]
    summary = dict(
        scale=study.scale,
        budgets=study.S,
        claim1=c1,
        claim1_summary=claim1_summary(c1),
        claim2=c2,
        final=data["final"],
        done=data["done"],
        curves=data["curves"],
    )
    files = []
    md = markdown(data, c1, c2)
    if repeats:
        runs = {dmd_seed(data): data}
        for w in repeats:
            d = collect(w)
            seed = dmd_seed(d)
            if seed in runs:
                raise ValueError(f"{w} repeats seed {seed}, already in the report; each repeat needs its own --seed")
            runs[seed] = d
        seeds = [r for x in DMD_SUFFIXES for r in claim2_over_seeds(runs, x) if len(r["seeds"]) > 1]
        summary["claim2_over_seeds"] = seeds
        md += "\n" + seeds_markdown(seeds)
        files += _seeds_plot(seeds, out)
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(md)
    files = plots(data, out, study.workdir) + files
    print(md)
    print("wrote", os.path.join(out, "study.md"), os.path.join(out, "study.json"), *files)
    return summary
