"""The play server (crm_jax.play): its JSON API over HTTP, and the page in headless Chromium.

The shipped teacher stands in for the student (no `make demo` run needed): the student path is
the 1-step consistency sampler of the same weights, so its speed is the student's.

The browser test drives Chromium through chromedriver's WebDriver protocol with the standard
library only. It checks that the simulator panel follows the keys exactly; the model panel's
motion is checked only with CRM_PLAY_CHECK_MODEL=1 (the shipped toy teacher does not follow
actions reliably; set it when --student is a model that does, via CRM_PLAY_STUDENT=PATH).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from crm_jax.data import toy_world as tw
from crm_jax.play import server as S

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MIN_STUDENT_FPS = 15.0


def _post(url: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _serve(app):
    srv = S.make_server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, S.url_of(srv)


@pytest.fixture(scope="module")
def served():
    student = os.environ.get("CRM_PLAY_STUDENT", S.DEFAULT_TEACHER)
    app = S.PlayApp(student, S.DEFAULT_TEACHER)  # compiles both samplers
    srv, url = _serve(app)
    yield app, url
    srv.shutdown()
    srv.server_close()


def _expected_step(pos, action: int, world: tw.ToyWorldConfig, frames: int = 2) -> np.ndarray:
    lo, hi = world.bounds
    for _ in range(frames):
        pos = np.clip(pos + world.action_speed * tw.ACTION_DELTAS[action], lo, hi)
    return pos


# ----------------------------------------------------------------------------- HTTP


def test_sessions_steps_and_bad_input(served):
    app, url = served
    world = app.world
    code, a = _post(url + "api/session", {"seed": 5})
    assert code == 200, a
    code, b = _post(url + "api/session", {"seed": 5})
    assert code == 200 and a["session"] != b["session"]  # each tab its own session
    shape = [2, world.height, world.width, 3]
    for panel in ("model", "truth"):
        assert a["frames"][panel]["shape"] == shape
    np.testing.assert_array_equal(S.decode_frames(a["frames"]["model"]), S.decode_frames(a["frames"]["truth"]))

    pos = None
    for name in tw.ACTION_NAMES:
        code, r = _post(url + "api/step", {"session": a["session"], "action": name})
        assert code == 200, r
        assert r["actions"] == [tw.ACTION_NAMES.index(name)] * 2
        for panel in ("model", "truth"):
            f = S.decode_frames(r["frames"][panel])
            assert f.shape == tuple(shape) and f.dtype == np.uint8
        truth = S.decode_frames(r["frames"]["truth"]).astype(np.float32) / 255
        det = np.asarray(tw.detect(truth, np.asarray(r["colors"]), world)[0])[:, 0]
        np.testing.assert_allclose(det, r["truth_pos"])  # the detector finds the simulator's sprite
        if pos is not None:
            np.testing.assert_allclose(det[-1], _expected_step(pos, tw.ACTION_NAMES.index(name), world))
        pos = det[-1]
        assert np.isfinite(r["chunk_error"]) and np.isfinite(r["mean_error"]) and r["model_fps"] > 0
    # one action per frame
    code, r = _post(url + "api/step", {"session": a["session"], "action": ["left", "up"]})
    assert code == 200 and r["actions"] == [3, 1]
    chunk = r["chunk"]

    # unknown actions are refused (400) and change nothing; other sessions are untouched
    for bad in ("jump", 7, None, ["up", "up", "up"], True):
        code, r = _post(url + "api/step", {"session": a["session"], "action": bad})
        assert code == 400 and "error" in r, (bad, r)
    assert "stay up down left right" in _post(url + "api/step", {"session": a["session"], "action": "jump"})[1]["error"]
    code, r = _post(url + "api/step", {"session": a["session"], "action": "stay"})
    assert r["chunk"] == chunk + 1
    code, r = _post(url + "api/step", {"session": b["session"], "action": "stay"})
    assert r["chunk"] == 1
    assert _post(url + "api/step", {"session": "nope", "action": "up"})[0] == 404
    assert _post(url + "api/nothing", {})[0] == 404
    assert _post(url + "api/model", {"session": a["session"], "which": "critic"})[0] == 400

    # switching models continues the same rollout; a new episode restarts it
    code, r = _post(url + "api/model", {"session": a["session"], "which": "teacher"})
    assert code == 200 and r["which"] == "teacher"
    code, r = _post(url + "api/step", {"session": a["session"], "action": "down"})
    assert code == 200 and r["which"] == "teacher" and r["chunk"] == chunk + 2
    code, r = _post(url + "api/episode", {"session": a["session"], "seed": 6})
    assert code == 200 and r["chunk"] == 0 and r["seed"] == 6

    code, text = _get(url)
    assert code == 200 and "<canvas" in text


def test_missing_checkpoint_error_page(tmp_path):
    missing = str(tmp_path / "runs" / "demo" / "sf_dmd" / "export")
    app = S.PlayApp(missing, S.DEFAULT_TEACHER, warmup=False)
    srv, url = _serve(app)
    try:
        code, text = _get(url)
        assert code == 404 and missing in text and "make demo" in text and "/?model=teacher" in text
        code, r = _post(url + "api/session", {"which": "student"})
        assert code == 404 and missing in r["error"] and "make demo" in r["error"]
        code, text = _get(url + "?model=teacher")
        assert code == 200 and "<canvas" in text
        code, t = _post(url + "api/session", {"which": "teacher"})
        assert code == 200
        code, r = _post(url + "api/model", {"session": t["session"], "which": "student"})
        assert code == 404 and missing in r["error"]
        status = json.loads(_get(url + "api/status")[1])
        assert status["models"]["student"]["loaded"] is False and status["models"]["teacher"]["loaded"] is True
        # idle sessions expire
        app.idle_s = 0.0
        old = t["session"]
        assert _post(url + "api/session", {"which": "teacher"})[0] == 200
        assert _post(url + "api/episode", {"session": old})[0] == 404
    finally:
        srv.shutdown()
        srv.server_close()


def test_non_local_host_refused():
    from crm_jax.play.__main__ import main

    for host in ("127.0.0.1", "localhost", "::1"):
        S.check_host(host)
    for host in ("0.0.0.0", "192.168.1.5", "example.org", "::"):
        with pytest.raises(ValueError, match="--allow_remote"):
            S.check_host(host)
        S.check_host(host, allow_remote=True)
    with pytest.raises(ValueError, match="not a local address"):
        main(["--host", "0.0.0.0", "--port", "0"])  # refused before any model is loaded


def test_command_prints_url(tmp_path):
    """`python -m crm_jax.play` from another directory: prints the URL; without checkpoints (nothing
    to compile) the page names the missing paths."""
    import sys

    student, teacher = str(tmp_path / "no_student"), str(tmp_path / "no_teacher")
    env = dict(os.environ, PYTHONPATH=S.REPO_ROOT, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "crm_jax.play", "--port", "0", "--student", student, "--teacher", teacher]
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        assert "http://127.0.0.1:" in line, (line, (tmp_path / "stderr.txt").read_text()[-3000:])
        url = line.split("open ", 1)[1].split()[0]
        code, text = _get(url)
        assert code == 404 and student in text and "make demo" in text
        code, text = _get(url + "?model=teacher")
        assert code == 404 and teacher in text
    finally:
        proc.terminate()
        proc.wait(30)
        err.close()


def test_frames_per_second(served):
    """>= 15 frames/s with the 1-step student over HTTP on this machine (the teacher is reported)."""
    app, url = served
    fps = {}
    for which in ("student", "teacher"):
        code, r = _post(url + "api/session", {"seed": 1, "which": which})
        sid, n = r["session"], 30 if which == "student" else 8
        _post(url + "api/step", {"session": sid, "action": "up"})
        t0 = time.perf_counter()
        for i in range(n):
            code, r = _post(url + "api/step", {"session": sid, "action": tw.ACTION_NAMES[i % 5]})
            assert code == 200
        fps[which] = 2 * n / (time.perf_counter() - t0)
    print(f"\nplay frames/s over HTTP: student {fps['student']:.1f}, teacher {fps['teacher']:.1f}")
    assert fps["student"] >= MIN_STUDENT_FPS, fps


# ----------------------------------------------------------------------------- browser

KEY_CODES = {"right": "\ue014", "left": "\ue012", "up": "\ue013", "down": "\ue015", "stay": "\ue00d"}


class WebDriver:
    """The few WebDriver commands the test needs, over chromedriver's HTTP API."""

    def __init__(self, port: int, profile: str):
        self.base = f"http://127.0.0.1:{port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless=new",
                            "--no-sandbox",
                            "--disable-gpu",
                            "--disable-dev-shm-usage",
                            "--window-size=1100,900",
                            f"--user-data-dir={profile}",
                        ],
                    },
                }
            }
        }
        self.sid = self.cmd("POST", "/session", caps)["sessionId"]

    def cmd(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data, {"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read().decode()[:500]}") from None

    def s(self, method: str, path: str, body=None):
        return self.cmd(method, f"/session/{self.sid}{path}", body)

    def js(self, script: str, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def press(self, key: str):
        acts = [{"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}]
        self.s("POST", "/actions", {"actions": [{"type": "key", "id": "keyboard", "actions": acts}]})

    def wait(self, script: str, timeout: float = 60.0):
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = self.js(script)
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {script!r}; page error: {self.js('return document.getElementById("error").textContent')!r}"
        )

    def quit(self):
        try:
            self.cmd("DELETE", f"/session/{self.sid}")
        except Exception:
            pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    port = _free_port()
    proc = subprocess.Popen(
        [CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
                    if json.load(r)["value"]["ready"]:
                        break
            except OSError:
                pass
            if time.time() - t0 > 30 or proc.poll() is not None:
                pytest.fail("chromedriver did not start")
            time.sleep(0.1)
        d = WebDriver(port, str(tmp_path / "chromium-profile"))
        yield d
        d.quit()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


CANVAS_PIXELS = """
const c = document.getElementById(arguments[0]);
return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
"""


def _canvas(d: WebDriver, cid: str, world: tw.ToyWorldConfig) -> np.ndarray:
    rgba = np.asarray(d.js(CANVAS_PIXELS, cid), np.float32).reshape(world.height, world.width, 4)
    return rgba[..., :3] / 255


def check_model_follows(frames: np.ndarray, actions: list[int], colors, world, min_accuracy: float = 0.75):
    """The model panel's controlled sprite moves the commanded way (`action_following_accuracy`).

    frames `[T, H, W, 3]` in [0, 1]: the first block's last frame, then the last frame of every chunk;
    actions `[T]`: each chunk's action (the first entry is unused).
    Called only with CRM_PLAY_CHECK_MODEL=1: the shipped teacher does not pass it."""
    acc = float(tw.action_following_accuracy(frames, np.asarray(actions, np.int32), np.asarray(colors), world))
    assert acc >= min_accuracy, f"model follows {acc:.2f} of the actions, want >= {min_accuracy}"


def test_browser_play(served, browser, tmp_path):
    app, url = served
    world, d = app.world, browser
    d.s("POST", "/url", {"url": url + "?seed=3"})
    d.wait("return window.play && window.play.shown === 1")
    sid1 = d.js("return window.play.session")
    colors = d.js("return window.play.colors")
    truth0 = _canvas(d, "truth", world)
    pos = np.asarray(tw.detect(truth0[None], np.asarray(colors), world)[0])[0, 0]
    assert np.isfinite(pos).all()

    keys = ["right", "right", "down", "down", "left", "up", "stay"]
    truth_frames, model_frames, acts, moved = [truth0], [_canvas(d, "model", world)], [0], 0
    for i, k in enumerate(keys):
        d.press(KEY_CODES[k])
        d.wait(f"return window.play.shown === {i + 2} && !window.play.busy")
        truth = _canvas(d, "truth", world)
        new = np.asarray(tw.detect(truth[None], np.asarray(colors), world)[0])[0, 0]
        want = _expected_step(pos, tw.ACTION_NAMES.index(k), world)
        np.testing.assert_allclose(new, want, err_msg=f"key {k} (step {i})")  # the ground truth follows exactly
        moved += int(np.any(new != pos))
        pos = new
        truth_frames.append(truth)
        model_frames.append(_canvas(d, "model", world))
        acts.append(tw.ACTION_NAMES.index(k))
    assert moved >= 4  # the sprite did move (not stuck in a corner)

    # unknown keys are ignored: no request, nothing drawn
    d.press("x")
    d.press("\ue007")  # Enter
    time.sleep(0.5)
    assert d.js("return window.play.steps") == len(keys)

    # model frames arrived and the numbers are shown
    log = d.js("return window.play.log")
    assert [e["actions"] for e in log] == [[a, a] for a in acts[1:]]
    assert all(m.std() > 0 for m in model_frames)
    for nid in ("err", "meanerr", "modelfps", "meanfps", "streamfps"):
        text = d.js(f"return document.getElementById('{nid}').textContent")
        assert text != "-" and float(text) >= 0, (nid, text)
    check_model_follows(np.stack(truth_frames), acts, colors, world, min_accuracy=1.0)  # the check itself
    if os.environ.get("CRM_PLAY_CHECK_MODEL") == "1":
        check_model_follows(np.stack(model_frames), acts, colors, world)

    shot = base64.b64decode(d.s("GET", "/screenshot"))
    path = tmp_path / "play.png"
    path.write_bytes(shot)
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10, "blank screenshot"
    keep = os.environ.get("CRM_PLAY_SCREENSHOT")
    if keep:
        shutil.copy(path, keep)

    # the buttons: teacher/student switch and a new episode
    d.js("document.getElementById('switch').click()")
    d.wait("return window.play.which === 'teacher'")
    d.press(KEY_CODES["up"])
    d.wait(f"return window.play.shown === {len(keys) + 2} && !window.play.busy")
    assert d.js("return window.play.last.which") == "teacher"
    d.js("document.getElementById('new').click()")
    d.wait(f"return window.play.shown === {len(keys) + 3} && window.play.frames === 2")

    # a second tab gets its own session
    handle = d.s("POST", "/window/new", {"type": "tab"})["handle"]
    d.s("POST", "/window", {"handle": handle})
    d.s("POST", "/url", {"url": url})
    d.wait("return window.play && window.play.shown === 1")
    assert d.js("return window.play.session") != sid1
