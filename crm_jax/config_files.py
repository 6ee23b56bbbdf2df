"""Config files (`configs/*.py` with `get_config()`), loaded by path like `--config=FILE` does.

A relative path is resolved against the repository root (the directory above `crm_jax/`), so a
program finds the shipped configs whatever its working directory.
"""

from __future__ import annotations

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_path(path: str) -> str:
    """`path` itself when absolute, else `path` under the repository root."""
    return path if os.path.isabs(path) else os.path.join(REPO_ROOT, path)


def load_config(path: str, arg: str | None = None):
    """`get_config()` (or `get_config(arg)`) of the config file at `path` (see `config_path`)."""
    file = config_path(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"config file {path!r} not found (looked at {file})")
    name = "crm_config_" + os.path.splitext(os.path.basename(file))[0]
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)
