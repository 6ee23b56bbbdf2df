"""python -m crm_jax.play [--student PATH] [--teacher PATH] [--host 127.0.0.1] [--port 0] [--allow_remote]

Starts the play server on a local address and prints its URL (docs/play.md). Defaults: the demo's
SF-DMD student (runs/demo/sf_dmd/export, made by `make demo`) and the shipped teacher
(crm_jax/assets/toy_teacher), found whatever the working directory.
"""

from __future__ import annotations

import argparse


def parse_args(argv=None):
    from crm_jax.play import server as S

    p = argparse.ArgumentParser(prog="python -m crm_jax.play", description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--student", default=S.DEFAULT_STUDENT, help="student checkpoint (crm_jax NNX directory)")
    p.add_argument("--teacher", default=S.DEFAULT_TEACHER, help="teacher checkpoint (crm_jax NNX directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (local only unless --allow_remote)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("--allow_remote", action="store_true", help="allow a non-local --host (no authentication!)")
    p.add_argument("--student_steps", type=int, default=1, help="consistency steps per chunk of the student")
    p.add_argument("--teacher_steps", type=int, default=8, help="Euler steps per chunk of the teacher")
    p.add_argument("--guidance", type=float, default=2.0, help="the teacher's CFG scale")
    p.add_argument("--idle_s", type=float, default=600.0, help="drop sessions idle this long (s)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    if args.student_steps < 1 or args.teacher_steps < 1:
        p.error("--student_steps and --teacher_steps must be >= 1")
    return args


def main(argv=None) -> int:
    from crm_jax.play import server as S

    args = parse_args(argv)
    S.check_host(args.host, args.allow_remote)  # before loading anything
    S.log("loading and compiling the models ...")
    app = S.PlayApp(
        args.student,
        args.teacher,
        student_steps=args.student_steps,
        teacher_steps=args.teacher_steps,
        guidance=args.guidance,
        idle_s=args.idle_s,
        log=S.log,
    )
    for err in app.errors.values():
        S.log(f"warning: {err}")
    try:
        server = S.make_server(app, args.host, args.port, args.allow_remote, quiet=not args.verbose)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"crm_jax play: open {S.url_of(server)}  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def console() -> None:
    from crm_jax.errors import run_command

    run_command(lambda argv: main(argv[1:]), parse_flags=False)


if __name__ == "__main__":
    console()
