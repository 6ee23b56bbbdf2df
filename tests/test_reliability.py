"""Bad input at the command lines: each probe ends with one `error:` line and its exit code (2 for
usage errors, 1 for runtime failures), before anything is computed or written."""

import os
import subprocess
import sys

import pytest

from crm_jax.assets import TOY_TEACHER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT, timeout=240):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("CRM_DEBUG", None)
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr.strip().splitlines()


TRAIN = ("-m", "crm_jax.main", "--config=configs/toy_tf_scm.py")

PROBES = {
    "typo_top_level": (["--config.num_iteration=3"], 2, "did you mean --config.num_iterations?"),
    "typo_nested": (["--config.train.lrr=0.1"], 2, "did you mean --config.train.lr?"),
    "bad_type": (["--config.num_iterations=abc"], 2, "invalid literal"),
    "negative_iterations": (["--config.num_iterations=-5"], 2, "--config.num_iterations=-5: must be an integer >= 1"),
    "zero_batch": (["--config.data.batch_size=0"], 2, "--config.data.batch_size=0"),
    "zero_checkpoint_every": (["--config.checkpoint.every=0"], 2, "--config.checkpoint.every=0"),
    "unknown_data_kind": (["--config.data.kind=foo"], 2, "--config.data.kind='foo': must be one of"),
    "unknown_mode": (["--config.mode=tf_scmm"], 2, "did you mean tf_scm?"),
    "dataset_without_path": (["--config.data.kind=dataset"], 2, "--config.data.path is empty"),
    "mesh_too_big": (["--config.mesh.data=16"], 2, "needs 16 devices"),
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_training_config_errors_are_one_line(name, tmp_path):
    extra, code, text = PROBES[name]
    workdir = tmp_path / "w"
    rc, _, err = run(*TRAIN, f"--workdir={workdir}", *extra)
    assert rc == code and len(err) == 1 and err[0].startswith("error: ") and text in err[0], (rc, err)
    assert not workdir.exists()  # nothing made before the check


def test_workdir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("kept")
    rc, _, err = run(*TRAIN, f"--workdir={f}")
    assert rc == 2 and err == [f"error: --workdir = '{f}' is a file, not a directory: choose a directory"]
    assert f.read_text() == "kept"


def test_debug_flag_shows_the_traceback(tmp_path):
    rc, _, err = run(*TRAIN, f"--workdir={tmp_path / 'w'}", "--config.num_iterations=-5", "--debug")
    assert rc == 2 and any(line.startswith("Traceback") for line in err) and err[-1].startswith("error: ")


def test_second_live_run_in_a_workdir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    import fcntl
    import json

    from crm_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, workdir_lock

    with workdir_lock(str(tmp_path)):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid()
        # a second run (another process) is refused with one line naming the holder
        rc, _, err = run(*TRAIN, f"--workdir={tmp_path}")
        assert rc == 1 and len(err) == 1 and f"pid {os.getpid()}" in err[0] and "in use by a live run" in err[0]
    # a lock file left by a dead process holds nothing: the next run takes it over
    with open(tmp_path / LOCK_FILE, "w") as f:
        f.write(json.dumps({"pid": 999999, "host": "gone"}))
    with workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with open(tmp_path / LOCK_FILE) as f:  # released on exit
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert WorkdirBusy.exit_code == 1


@pytest.mark.parametrize(
    "args,text",
    [
        (["--fps", "0"], "error: argument --fps: 0 must be > 0"),
        (["--dtype", "foo"], "error: argument --dtype: invalid choice: 'foo'"),
        (["--frames", "-1"], "error: argument --frames: -1 must be > 0"),
    ],
)
def test_sample_flag_errors_are_one_line(args, text, tmp_path):
    rc, _, err = run("-m", "crm_jax.sample", "--random_init", "--out", str(tmp_path / "a.gif"), *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith(text), err
    assert not (tmp_path / "a.gif").exists()


def test_sample_output_checked_before_any_compute(tmp_path):
    (tmp_path / "file").write_text("")
    rc, _, err = run("-m", "crm_jax.sample", "--random_init", "--out", str(tmp_path / "file" / "a.gif"))
    assert rc == 2 and len(err) == 1 and "is a file, not a directory" in err[0], err


def test_ode_init_without_ode_points_names_what_to_generate(tmp_path):
    rc, _, err = run(*TRAIN, f"--workdir={tmp_path / 'w'}", "--config.mode=ode_init", "--config.num_iterations=2")
    assert rc == 2 and len(err) == 1 and "--config.ode.save=True" in err[0], err


def test_damaged_teacher_checkpoint_is_one_line_naming_it(tmp_path):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(TOY_TEACHER, teacher)
    data = max((p for p in teacher.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)
    data.write_bytes(bytes(raw))
    rc, _, err = run(
        *TRAIN, f"--workdir={tmp_path / 'w'}", f"--config.init.teacher={teacher}", "--config.num_iterations=2"
    )
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"error: checkpoint {teacher} cannot be read"), err


BROKEN_CONFIGS = {
    "missing": (None, "not found"),
    "raises": ('raise RuntimeError("no such scene\\nsecond line")\n', "cannot be loaded: RuntimeError: no such scene"),
    "syntax_error": ("def get_config(:\n", "cannot be loaded: SyntaxError: invalid syntax"),
    "no_get_config": ("CONFIG = {}\n", "defines no get_config()"),
    "get_config_raises": ("def get_config():\n    return {}['mode']\n", "get_config() failed: KeyError: 'mode'"),
}
CONFIG_COMMANDS = {
    "train": (("-m", "crm_jax.main"), "--workdir"),
    "generate": (("-m", "crm_jax.data.generate"), "--out"),
    "aot": (("-m", "crm_jax.tools.aot", "--topology=v5e:2x2"), "--json"),
}


@pytest.mark.parametrize(
    "command,case",
    [("train", case) for case in sorted(BROKEN_CONFIGS)] + [("generate", "raises"), ("aot", "missing")],
)
def test_broken_config_file_is_one_line_naming_it(command, case, tmp_path):
    source, text = BROKEN_CONFIGS[case]
    path = tmp_path / "cfg.py"
    if source is not None:
        path.write_text(source)
    args, out_flag = CONFIG_COMMANDS[command]
    out = tmp_path / "out"
    rc, _, err = run(*args, f"--config={path}", f"{out_flag}={out}", timeout=120)
    assert rc == 2 and len(err) == 1, (rc, err)
    assert err[0].startswith(f"error: --config: config file '{path}'") and text in err[0], err
    assert "second line" not in err[0] and not out.exists()
