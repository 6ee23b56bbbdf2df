"""Up-front checks of the local input paths an entry point reads.

Every entry point of the real path (`crm_jax.data.generate`, `crm_jax.main`, `crm_jax.sample`)
calls `check_inputs` before it computes or writes anything: a missing checkpoint, dataset or
embedding file stops the run at once with one error that names each missing input (the config
field or command-line flag, the path, and what should be there).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

# What each kind of input must look like on disk.
CKPT = "checkpoint"  # Wan DiT directory: diffusers/original (config.json) or crm_jax NNX (wan_config.json)
DATASET = "dataset"  # generated dataset directory (metadata.json)
VAE = "vae"  # diffusers AutoencoderKLWan directory (config.json) or an original .pth/.safetensors
FILE = "file"  # a plain file
PATH = "path"  # a file or a directory

_MARKERS = {CKPT: ("config.json", "wan_config.json"), DATASET: ("metadata.json",), VAE: ("config.json",)}
_HINTS = {
    CKPT: "a Wan2.1 DiT checkpoint directory (python -m crm_jax.tools.convert_wan, or a training run's export/)",
    DATASET: "a generated dataset directory (python -m crm_jax.data.generate)",
    VAE: "a Wan2.1 VAE: a diffusers AutoencoderKLWan directory (e.g. <pipeline>/vae) or Wan2.1_VAE.pth",
}


class MissingInputError(FileNotFoundError, ValueError):
    """One or more input paths do not exist (or are not what they should be). A ValueError too, like
    the other input errors of the command lines."""


@dataclasses.dataclass(frozen=True)
class Input:
    """An input path: `name` is how the user set it (a config field or a flag), `kind` one of
    CKPT / DATASET / VAE / FILE / PATH, `hint` what should be there (default: by kind)."""

    name: str
    path: str
    kind: str = PATH
    hint: str = ""
    required: bool = True


def problem(inp: Input) -> str | None:
    """Why `inp` is unusable, or None."""
    what = inp.hint or _HINTS.get(inp.kind, "")
    tail = f" (expected {what})" if what else ""
    if not inp.path:
        return f"{inp.name} is empty{tail}" if inp.required else None
    p = inp.path
    if not os.path.exists(p):
        return f"{inp.name} = {p!r}: no such file or directory{tail}"
    if inp.kind == FILE and not os.path.isfile(p):
        return f"{inp.name} = {p!r}: is not a file{tail}"
    if inp.kind in _MARKERS:
        if inp.kind == VAE and os.path.isfile(p):
            return None
        if not os.path.isdir(p):
            return f"{inp.name} = {p!r}: is not a directory{tail}"
        if not any(os.path.isfile(os.path.join(p, m)) for m in _MARKERS[inp.kind]):
            return f"{inp.name} = {p!r}: holds no {' or '.join(_MARKERS[inp.kind])}{tail}"
    return None


def check_inputs(inputs: Iterable[Input], what: str = "") -> None:
    """Raise `MissingInputError` listing every unusable input (nothing is touched)."""
    bad = [m for m in (problem(i) for i in inputs) if m]
    if bad:
        head = f"{what}: missing input" if what else "missing input"
        head += "s" if len(bad) > 1 else ""
        raise MissingInputError(head + ":\n  " + "\n  ".join(bad))


class OutputPathError(PermissionError, ValueError):
    """An output path that cannot be written (checked before any compute)."""


def check_output(name: str, path: str, *, is_dir: bool) -> None:
    """Raise `OutputPathError` unless `path` can be created or written: a directory (`is_dir`) or a
    file. `name` is the flag or config field that set it. Nothing is created."""
    if not path:
        raise OutputPathError(f"{name} is empty: give an output {'directory' if is_dir else 'file'}")
    p = os.path.abspath(path)
    if os.path.exists(p):
        if is_dir and not os.path.isdir(p):
            raise OutputPathError(f"{name} = {path!r} is a file, not a directory: choose a directory")
        if not is_dir and os.path.isdir(p):
            raise OutputPathError(f"{name} = {path!r} is a directory: give a file name")
        target = p if is_dir else os.path.dirname(p)
        if not os.access(target if is_dir else p, os.W_OK) or not os.access(target, os.W_OK | os.X_OK):
            raise OutputPathError(f"{name} = {path!r} is not writable: choose another path or fix its permissions")
        return
    parent = os.path.dirname(p)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputPathError(f"{name} = {path!r}: {parent!r} is a file, not a directory: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or parent.startswith(("/proc", "/sys")):
        raise OutputPathError(f"{name} = {path!r}: {parent!r} is not writable: choose another path")


def _get(c, dotted: str, default=""):
    node = c
    for k in dotted.split("."):
        if node is None or k not in node:
            return default
        node = node[k]
    return node


def training_inputs(c) -> list[Input]:
    """The local inputs of a training config (`crm_jax.main`)."""
    from crm_jax.training.modes import REGISTRY

    if c.mode not in REGISTRY:
        return []
    out = []
    if _get(c, "data.kind") == "dataset":
        out.append(Input("config.data.path", _get(c, "data.path"), DATASET))
    if _get(c, "init.student"):
        out.append(Input("config.init.student", c.init.student, CKPT))
    needs_teacher = REGISTRY[c.mode].needs_teacher
    if needs_teacher:
        random_ok = bool(_get(c, "init.allow_random_teacher", False))
        out.append(Input("config.init.teacher", _get(c, "init.teacher"), CKPT, required=not random_ok))
        if _get(c, "init.dmd_teacher"):
            out.append(Input("config.init.dmd_teacher", c.init.dmd_teacher, CKPT))
    return out


def generation_inputs(c) -> list[Input]:
    """The local inputs of a generation config (`crm_jax.data.generate`)."""
    out = [Input("config.teacher", _get(c, "teacher"), CKPT, required=not bool(_get(c, "allow_random_teacher", False)))]
    kind = _get(c, "cond.kind")
    if kind == "embeddings":
        out.append(
            Input(
                "config.cond.embeddings",
                _get(c, "cond.embeddings"),
                FILE,
                hint="prompt embeddings .npz (python -m crm_jax.tools.encode_prompts)",
            )
        )
    elif kind == "toy_prompts":
        out.append(Input("config.cond.prompt_file", _get(c, "cond.prompt_file"), FILE, hint="a toy prompt file"))
    return out
