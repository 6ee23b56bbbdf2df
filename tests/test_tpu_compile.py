"""The TPU path compiles for real chips (v4, v5e, v5p, v6e), checked on a CPU host.

Each test runs `tests/tpu_compile_worker.py` in a subprocess with libtpu (the `libtpu` package
pinned by `jax[tpu]==0.11.2`; `make venv` installs it beside the environment in
`.venv/libtpu`, kept off the default path so that CPU runs do not probe for a TPU). libtpu
admits one process at a time, so the subprocesses take a file lock and pytest-xdist workers
run them one after another. What each group compiles, and at which sizes, is in the
worker's docstring. A train step takes 2-4 minutes to compile on 2 cores, so every run compiles
TF-sCM and the SF-DMD student and critic at 480p with 6 latent frames; `CRM_TPU_STEPS_ALL=1`
adds every other mode (teacher_tf, tf_meanflow, tf_dcm, ode_init, rcm, TF-sCM with a 14B
teacher) and `CRM_TPU_STEPS_FULL=1` compiles at 21 frames (numbers in docs/tpu.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "tpu_compile_worker.py")
LOCK = "/tmp/crm_jax_libtpu.lock"
# One compile group at a time (libtpu and the memory of 2 cores): a test may wait for the others.
LOCK_WAIT_S = 1200

pytestmark = pytest.mark.tpu_compile


def libtpu_dir() -> str | None:
    """A directory holding the `libtpu` package: $CRM_LIBTPU_DIR, the venv's `libtpu/`, or None
    when `libtpu` is importable as installed."""
    for d in (os.environ.get("CRM_LIBTPU_DIR"), os.path.join(sys.prefix, "libtpu")):
        if d and os.path.isdir(os.path.join(d, "libtpu")):
            return d
    try:
        import importlib.util

        if importlib.util.find_spec("libtpu") is not None:
            return None
    except ImportError:
        pass
    pytest.fail(
        "libtpu is not installed: `make venv` puts it in .venv/libtpu "
        "(pip install --target .venv/libtpu libtpu==0.0.48.1), or set CRM_LIBTPU_DIR"
    )


def run_group(tmp_path, group: str, *args: str, timeout: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    d = libtpu_dir()
    if d:
        env["PYTHONPATH"] = os.pathsep.join([d, ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    out = tmp_path / f"{group}.json"
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            [sys.executable, WORKER, group, str(out), *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    assert proc.returncode == 0, f"worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    assert rows, "the worker compiled nothing"
    return rows


def assert_all_compiled(rows):
    failed = [f"{r['case']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(rows)} cases did not compile:\n" + "\n".join(failed)


@pytest.mark.timeout(LOCK_WAIT_S + 1200)
def test_attention_kernels_compile_for_tpu_chips(tmp_path):
    rows = run_group(tmp_path, "kernels", timeout=1200)
    assert_all_compiled(rows)
    cases = {r["case"] for r in rows}
    for topo in ("v5e:1x1", "v5p:2x2x1"):
        for mask in (
            "full",
            "block_causal_frame",
            "block_causal_chunk3",
            "teacher_forcing_frame",
            "teacher_forcing_chunk3",
            "cross_text512",
        ):
            for ad in ("forward", "jvp", "grad"):
                assert f"{topo}/{mask}/{ad}" in cases
    for topo in ("v4:2x2x1", "v6e:1x1"):
        assert f"{topo}/teacher_forcing_frame/grad" in cases
    # The compiler sees the block sparsity: the kernels' cost estimates count the visited tiles
    # only (teacher forcing at 65,520 tokens: about a quarter of dense attention).
    from pallas_kernels import masks
    from pallas_kernels.mosaic import default_config

    tf = next(r for r in rows if r["case"] == "v5p:2x2x1/teacher_forcing_frame/forward")
    spec = masks.teacher_forcing(21, 1560, 1)
    bq, bk = default_config(spec.q_len, spec.kv_len).fwd
    visited = masks.tile_runs(spec, bq, bk).visited_pairs
    expected = visited * 4 * bq * bk * 128 * 12
    assert abs(tf["flops"] - expected) <= 0.01 * expected, (tf, expected)
    assert expected < 0.35 * 4 * spec.q_len**2 * 128 * 12


@pytest.mark.timeout(LOCK_WAIT_S + 900)
def test_wan_1_3b_forward_jvp_and_grad_compile_for_tpu(tmp_path):
    rows = run_group(tmp_path, "model", timeout=900)
    assert_all_compiled(rows)
    assert {r["case"] for r in rows} == {
        "v5p/wan_1_3b/forward_block_causal",
        "v5p/wan_1_3b/jvp_teacher_forcing",
        "v5p/wan_1_3b/grad_teacher_forcing",
    }


ALL_MODES = {"teacher_tf", "tf_scm", "tf_meanflow", "tf_dcm", "ode_init", "sf_dmd", "rcm", "tf_scm_14b_teacher"}
# Every CI run: the JVP (sCM) step and the self-forcing DMD student and critic steps, the parts no
# other check compiles. CRM_TPU_STEPS_ALL=1: every mode (about 25 minutes more on 2 cores).
CI_MODES = {"tf_scm", "sf_dmd"}


@pytest.mark.timeout(LOCK_WAIT_S + 1800)
def test_train_steps_compile_for_a_v5p_slice(tmp_path):
    latents = "21,60,104,16" if os.environ.get("CRM_TPU_STEPS_FULL") else "6,60,104,16"
    modes = ALL_MODES if os.environ.get("CRM_TPU_STEPS_ALL") else CI_MODES
    rows = run_group(tmp_path, "steps", "--latents", latents, "--modes", ",".join(sorted(modes)), timeout=5400)
    assert_all_compiled(rows)
    names = {r["case"].split("/")[1] for r in rows}
    assert names == modes
    for r in rows:
        assert all(s["total_bytes"] <= 95 * 2**30 for s in r["steps"]), r  # a v5p chip's HBM
        assert all(s["flops"] > 0 for s in r["steps"]), r
    crit = next(r for r in rows if r["case"].endswith("/sf_dmd"))
    assert [s["step"] for s in crit["steps"]] == ["student (4 SF steps)", "critic (4 SF steps)"]
