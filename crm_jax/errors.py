"""One error path for every command line.

Configuration, input and data errors are this project's error types (or ValueErrors raised while
checking inputs). :func:`run_command` runs a command and turns them into one line on stderr::

    error: <what>, <which file/flag/field>, <what to do>

with exit code 2 for usage errors (flags, config fields, paths given) and 1 for runtime failures
(damaged data or checkpoints, non-finite training). ``--debug`` (or ``CRM_DEBUG=1``) shows the
traceback instead; ``--verbose`` brings back the libraries' INFO logs, which are off by default.
Ctrl-C ends with exit code 130 and one line.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence


class CrmError(Exception):
    """A failure the user can act on; its message says what, where and what to do."""

    exit_code = 1


class UsageError(CrmError, ValueError):
    """A bad flag, config field or path given on the command line (exit code 2)."""

    exit_code = 2


def flatten_keys(config, prefix: str = "") -> list[str]:
    """Dotted names of every field of a nested ``ConfigDict`` / dict."""
    out = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        out.append(name)
        if hasattr(v, "items"):
            out += flatten_keys(v, f"{name}.")
    return out


def nearest(name: str, options: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def config_file_arg(argv: Sequence[str], flag: str = "config") -> str | None:
    """The value of ``--FLAG=VALUE`` (or ``--FLAG VALUE``) in ``argv``, or None."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag}="):
            return a.split("=", 1)[1]
        if a == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def load_config_file(spec: str, flag: str = "config"):
    """``get_config()`` of ``--FLAG=FILE[:ARG]`` (``get_config(ARG)`` with an argument), read as
    ml_collections reads it (FILE relative to the working directory). A missing file, one that
    raises or does not parse, one without ``get_config`` and a failing ``get_config`` each raise
    a UsageError naming the file (and the exception's first line)."""
    import importlib.util

    path, sep, arg = spec.partition(":")
    where = f"--{flag}: config file {path!r}"
    if not path:
        raise UsageError(f"--{flag} is empty: give a config file, e.g. --{flag}=configs/toy_tf_scm.py")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "not found"
        looked = "" if os.path.isabs(path) else f" (looked at {os.path.abspath(path)})"
        raise UsageError(f"{where} {what}{looked}")
    try:
        module_spec = importlib.util.spec_from_file_location("_crm_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"{where} cannot be loaded: {_first_line(e)}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise UsageError(f"{where} defines no get_config(): a config file returns its config from get_config()")
    try:
        return get_config(arg) if sep else get_config()
    except Exception as e:
        call = f"get_config({arg!r})" if sep else "get_config()"
        raise UsageError(f"{where}: {call} failed: {_first_line(e)}") from e


def _load_config(argv: Sequence[str]):
    """The config of ``--config=FILE[:ARG]`` in ``argv`` (its ``get_config``), or None."""
    spec = config_file_arg(argv)
    if not spec:
        return None
    try:
        return load_config_file(spec)
    except UsageError:
        return None


def config_override_error(argv: Sequence[str], config=None) -> str | None:
    """The first ``--config.KEY=...`` of ``argv`` naming no field of the config, as a message."""
    config = config if config is not None else _load_config(argv)
    if config is None:
        return None
    keys = flatten_keys(config)
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config.") : arg.index("=")]
            if key not in keys:
                parent = key.rpartition(".")[0]
                siblings = [k for k in keys if k.rpartition(".")[0] == parent] or keys
                hint = nearest(key, siblings).replace("mean ", "mean --config.")
                return f"--config.{key}: the config has no field {key!r}{hint}"
    return None


def _is_config_file_flag(flag_values, name: str) -> bool:
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return name in flag_values and isinstance(flag_values[name].parser, ConfigFileFlagParser)


def _quiet_libraries(verbose: bool) -> None:
    """absl/Orbax INFO logs off unless ``verbose``."""
    import logging

    from absl import logging as absl_logging

    level = absl_logging.INFO if verbose else absl_logging.WARNING
    absl_logging.set_verbosity(level)
    for name in ("absl", "orbax", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _message(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = f"missing key {msg}"
    return " ".join(msg.split()) if "\n" not in msg else msg.replace("\n", "; ").replace(";   ", "; ")


def exit_code(e: BaseException) -> int:
    """2 for usage errors, 1 for runtime failures."""
    from absl import flags

    if isinstance(e, CrmError):
        return e.exit_code
    if isinstance(e, (flags.Error, PermissionError, FileNotFoundError)):
        return 2
    return 2 if isinstance(e, ValueError) and not isinstance(e, RuntimeError) else 1


def run_command(
    main: Callable[[list[str]], int | None],
    argv: list[str] | None = None,
    *,
    parse_flags: bool = True,
    handled: tuple[type[BaseException], ...] = (CrmError, ValueError, OSError),
) -> None:
    """Run ``main(argv)`` as a command and exit with its code (see the module docstring).

    ``parse_flags``: parse absl's global flags first (the commands that define them at import);
    a bad ``--config.KEY`` is reported with the nearest field. ``handled``: the error types turned
    into one line (anything else is a bug and keeps its traceback).
    """
    argv = list(sys.argv if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CRM_DEBUG", "") not in ("", "0")
    verbose = "--verbose" in argv
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    _quiet_libraries(verbose)
    try:
        if parse_flags:
            from absl import flags

            spec = config_file_arg(argv)
            if spec is not None and _is_config_file_flag(flags.FLAGS, "config"):
                load_config_file(spec)  # one line naming the file, before anything is imported or run
            try:
                argv = flags.FLAGS(argv)
            except (flags.Error, AttributeError, KeyError) as e:
                cfg = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
                raise UsageError(config_override_error(argv, cfg) or _message(e)) from e
        rc = main(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except handled as e:
        if debug:
            traceback.print_exc()
        else:  # a failed library call can leave coroutines whose collection at exit would print tracebacks
            sys.unraisablehook = lambda unraisable: None
        print(f"error: {_message(e)}", file=sys.stderr)
        sys.exit(exit_code(e))
    sys.exit(rc or 0)
