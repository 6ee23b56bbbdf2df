"""The play server: a local HTTP server (standard library) that streams toy-world rollouts.

Endpoints (JSON bodies; frames are base64 of uint8 RGB `[f, H, W, 3]`, row-major, with `shape`):

  GET  /                      the page (`page.html`); `/?model=teacher` starts with the teacher,
                              `/?seed=N` with episode N.
                              An error page (HTTP 404) naming the path and `make demo` when the
                              model's checkpoint is missing.
  GET  /api/status            models (path, loaded or the error), the world's size, sessions.
  POST /api/session           {which?: student|teacher, seed?: int} -> a new session: {session, which,
                              frames: {model, truth}, colors (palette ids, controlled sprite first), ...};
                              the first block is the episode's own.
  POST /api/step              {session, action: NAME | [NAME, NAME]} -> the next chunk: one action for
                              both frames or one per frame (names: stay up down left right); the model's
                              and the simulator's frames, the chunk's and the running trajectory error
                              (px), the model's frames/s. An unknown action is refused (HTTP 400, the
                              session is unchanged); the page only sends the five names.
  POST /api/episode           {session, seed?} -> a new episode in the same session.
  POST /api/model             {session, which} -> the other model continues the same rollout.

Errors are JSON `{error: ...}` with HTTP 400 (bad request), 404 (unknown session, missing checkpoint).
Each session (the page makes one per tab) holds its own episode, model window and action log;
sessions idle for `idle_s` seconds are dropped.
"""

from __future__ import annotations

import base64
import html
import json
import os
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

from crm_jax.assets import TOY_TEACHER

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_STUDENT = os.path.join(REPO_ROOT, "runs", "demo", "sf_dmd", "export")
DEFAULT_TEACHER = TOY_TEACHER
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MODELS = ("student", "teacher")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
MAKES = {
    "student": "`make demo` (writes runs/demo/sf_dmd/export; give another with --student PATH)",
    "teacher": "`python -m crm_jax.main --config=configs/toy_teacher_tf.py --workdir=runs/toy_teacher` "
    "(then --teacher runs/toy_teacher/export); the package ships crm_jax/assets/toy_teacher",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuse a non-local bind address unless `allow_remote` (ValueError naming the flag)."""
    if host not in LOCAL_HOSTS and not allow_remote:
        raise ValueError(
            f"--host {host!r} is not a local address ({', '.join(LOCAL_HOSTS)}): the play server has no "
            "authentication; pass --allow_remote to serve other machines"
        )


def encode_frames(frames: np.ndarray) -> dict:
    frames = np.ascontiguousarray(frames, np.uint8)
    return dict(shape=list(frames.shape), data=base64.b64encode(frames.tobytes()).decode("ascii"))


def decode_frames(d: dict) -> np.ndarray:
    """Inverse of `encode_frames` (for tests and clients)."""
    return np.frombuffer(base64.b64decode(d["data"]), np.uint8).reshape(d["shape"])


class PlayApp:
    """Models, world and sessions behind the HTTP handler (usable without HTTP)."""

    def __init__(
        self,
        student: str = DEFAULT_STUDENT,
        teacher: str = DEFAULT_TEACHER,
        *,
        student_steps: int = 1,
        teacher_steps: int = 8,
        guidance: float = 2.0,
        idle_s: float = 600.0,
        max_sessions: int = 64,
        warmup: bool = True,
        log=None,
    ):
        from crm_jax.data.toy_source import ToySource
        from crm_jax.play import engine as E

        self.E = E
        self.log = log or (lambda msg: None)
        self.paths = {"student": os.path.abspath(student), "teacher": os.path.abspath(teacher)}
        self.samplings = {
            "student": E.Sampling("consistency", student_steps),
            "teacher": E.Sampling("euler", teacher_steps, guidance=guidance),
        }
        self.world = E.demo_world()
        self.runners, self.errors = {}, {}
        for which in MODELS:
            self._load(which)
        if not self.runners:
            cfg_len, cfg_dim = 4, 32
        else:
            cfg = next(iter(self.runners.values())).cfg
            cfg_len, cfg_dim = cfg.text_len, cfg.text_dim
        self.src = ToySource(self.world, 1, cfg_len, cfg_dim)
        self.sessions: dict[str, object] = {}
        self.lock = threading.Lock()
        self.idle_s, self.max_sessions = idle_s, max_sessions
        if warmup:
            self.warmup()

    def _load(self, which: str) -> None:
        from crm_jax.models import convert

        path = self.paths[which]
        if not os.path.isdir(path):
            self.errors[which] = f"the {which} checkpoint {path} does not exist; create it with {MAKES[which]}"
            return
        try:
            model = convert.load_nnx(path)
        except Exception as e:  # a damaged or foreign checkpoint: reported on the page, not fatal
            self.errors[which] = f"cannot load the {which} checkpoint {path}: {e}"
            return
        cfg = model.cfg
        if cfg.in_channels != 12 or cfg.num_actions != 5:
            self.errors[which] = (
                f"the {which} checkpoint {path} is not a toy-world model "
                f"(in_channels={cfg.in_channels}, num_actions={cfg.num_actions}; want 12 and 5)"
            )
            return
        self.runners[which] = self.E.ModelRunner(model, self.samplings[which])

    def warmup(self) -> None:
        """Compile every window length of each model once (a few seconds per model on a CPU)."""
        for which in self.runners:
            t0 = time.perf_counter()
            s = self.E.Session("warmup", self.world, self.runners[which], which, 0, self.src)
            for _ in range(self.world.num_frames // s.runner.block):
                s.step([0])
            self.log(f"{which}: compiled in {time.perf_counter() - t0:.1f} s")

    # ------------------------------------------------------------------ sessions
    def runner(self, which: str):
        if which not in MODELS:
            raise ApiError(400, f"unknown model {which!r}; known: {', '.join(MODELS)}")
        if which not in self.runners:
            raise ApiError(404, self.errors[which])
        return self.runners[which]

    def _sweep(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.touched > self.idle_s:
                del self.sessions[sid]
        while len(self.sessions) >= self.max_sessions:
            del self.sessions[min(self.sessions, key=lambda k: self.sessions[k].touched)]

    def session(self, sid) -> object:
        with self.lock:
            s = self.sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise ApiError(404, f"no session {sid!r} (expired after {self.idle_s:.0f} s idle?): start a new one")
        s.touched = time.monotonic()
        return s

    def _reply(self, s, out: dict) -> dict:
        r = dict(
            session=s.id,
            which=s.which,
            sampling=self.describe(s.which),
            seed=s.seed,
            colors=[int(c) for c in np.asarray(s.colors)],
            chunk=s.chunks,
            frames=dict(model=encode_frames(out.pop("model")), truth=encode_frames(out.pop("truth"))),
        )
        r.update(out)
        return r

    def describe(self, which: str) -> str:
        s = self.samplings[which]
        if s.method == "euler":
            return f"{which}, {s.steps} Euler steps, CFG {s.guidance:g}"
        return f"{which}, {s.steps} step{'s' if s.steps > 1 else ''}"

    @staticmethod
    def _seed(body) -> int:
        seed = body.get("seed")
        if seed is None:
            return secrets.randbelow(2**31)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise ApiError(400, f"seed must be an int in [0, 2**31), got {seed!r}")
        return seed

    def new_session(self, body: dict) -> dict:
        which = body.get("which", "student")
        runner = self.runner(which)
        seed = self._seed(body)
        with self.lock:
            self._sweep()
            sid = secrets.token_hex(8)
            s = self.E.Session(sid, self.world, runner, which, seed, self.src)
            self.sessions[sid] = s
        return self._reply(s, s.first)

    def step(self, body: dict) -> dict:
        s = self.session(body.get("session"))
        action = body.get("action")
        names = action if isinstance(action, list) else [action]
        try:
            acts = [self.E.parse_action(a) for a in names]
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        with s.lock:
            try:
                out = s.step(acts)
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            return self._reply(s, out)

    def new_episode(self, body: dict) -> dict:
        s = self.session(body.get("session"))
        seed = self._seed(body)
        with s.lock:
            return self._reply(s, s.reset(s.runner, s.which, seed))

    def switch(self, body: dict) -> dict:
        s = self.session(body.get("session"))
        which = body.get("which")
        runner = self.runner(which)
        with s.lock:
            s.switch(runner, which)
            return dict(session=s.id, which=which, sampling=self.describe(which))

    def status(self) -> dict:
        return dict(
            models={
                w: dict(
                    path=self.paths[w], loaded=w in self.runners, error=self.errors.get(w), sampling=self.describe(w)
                )
                for w in MODELS
            },
            world=dict(height=self.world.height, width=self.world.width, block=2, frames=self.world.num_frames),
            sessions=len(self.sessions),
        )

    def page(self, which: str) -> tuple[int, str]:
        if which not in MODELS:
            return 400, error_page(f"unknown model {which!r}; known: {', '.join(MODELS)}")
        if which not in self.runners:
            other = [w for w in MODELS if w in self.runners]
            hint = (
                f'<p>Or play the {other[0]}: <a href="/?model={other[0]}">/?model={other[0]}</a></p>' if other else ""
            )
            return 404, error_page(self.errors[which], hint)
        with open(PAGE, encoding="utf-8") as f:
            return 200, f.read()


def error_page(message: str, extra_html: str = "") -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>crm_jax play: error</title></head>"
        f"<body><h1>Cannot start the player</h1><p class='error'>{html.escape(message)}</p>{extra_html}</body></html>"
    )


class Handler(BaseHTTPRequestHandler):
    server_version = "crm-play/1"
    app: PlayApp  # set on the subclass made by `make_server`
    quiet = True

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            which = parse_qs(url.query).get("model", ["student"])[0]
            status, text = self.app.page(which)
            self._send(status, text.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/status":
            self._json(200, self.app.status())
        elif url.path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, dict(error=f"no such page {url.path!r}"))

    def do_POST(self):
        routes = {
            "/api/session": self.app.new_session,
            "/api/step": self.app.step,
            "/api/episode": self.app.new_episode,
            "/api/model": self.app.switch,
        }
        fn = routes.get(urlparse(self.path).path)
        try:
            if fn is None:
                raise ApiError(404, f"no such endpoint {self.path!r}")
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise ApiError(400, "bad Content-Length") from None
            if not 0 <= n <= 65536:
                raise ApiError(400, "request body too large")
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                raise ApiError(400, "the request body is not JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            self._json(200, fn(body))
        except ApiError as e:
            self._json(e.status, dict(error=str(e)))
        except Exception as e:  # a bug: the page shows it, the server keeps serving
            self.log_error("%s: %r", self.path, e)
            self._json(500, dict(error=f"internal error: {type(e).__name__}: {e}"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def make_server(app: PlayApp, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False, quiet: bool = True):
    """A bound (not yet serving) HTTP server for `app`; call `serve_forever()` on it."""
    check_host(host, allow_remote)
    handler = type("PlayHandler", (Handler,), dict(app=app, quiet=quiet))
    server_cls = _Server
    if ":" in host:
        server_cls = type("_Server6", (_Server,), dict(address_family=socket.AF_INET6))
    return server_cls((host, port), handler)


def url_of(server) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
