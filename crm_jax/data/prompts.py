"""Prompt / action list files for synthetic-data generation.

Format: UTF-8 text, one sample per line::

    # comments and blank lines are ignored
    scene=1 color=3                          toy prompt, actions drawn from the world
    scene=0 color=red | up up right stay     toy prompt + one action per latent frame
    a cat walking on grass | 0 1 1 2          free text (Wan) + action ids

A line is ``PROMPT`` or ``PROMPT | ACTIONS``. ``ACTIONS`` are integers or names from
``toy_world.ACTION_NAMES`` separated by spaces or commas. Toy prompts are
``scene=<id> color=<id or name>`` (keys in any order). Any bad line raises ``ValueError``
naming the file and the 1-based line number.
"""

from __future__ import annotations

import dataclasses
import re

from crm_jax.data import toy_world as tw


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One parsed line: prompt text, optional actions ``[T]`` ids, and its origin."""

    prompt: str
    actions: tuple[int, ...] | None
    line: int


def _bad(path: str, line: int, msg: str):
    return ValueError(f"{path}:{line}: {msg}")


def parse_actions(text: str, num_actions: int) -> tuple[int, ...]:
    """``"up 1,right"`` -> ``(1, 1, 4)``; ids must be in ``[0, num_actions)``."""
    out = []
    for tok in re.split(r"[\s,]+", text.strip()):
        if not tok:
            continue
        if tok.lower() in tw.ACTION_NAMES:
            a = tw.ACTION_NAMES.index(tok.lower())
        else:
            try:
                a = int(tok)
            except ValueError:
                raise ValueError(f"action {tok!r} is neither an integer nor one of {tw.ACTION_NAMES}") from None
        if not 0 <= a < num_actions:
            raise ValueError(f"action id {a} out of range [0, {num_actions})")
        out.append(a)
    if not out:
        raise ValueError("empty action list after '|'")
    return tuple(out)


def read_prompt_file(
    path: str, *, num_frames: int | None = None, num_actions: int = tw.NUM_ACTIONS, require_actions: bool = False
) -> list[PromptLine]:
    """Parse a prompt/action file (format in the module docstring).

    Args:
      num_frames: if given, every action list must have exactly this many entries.
      num_actions: action vocabulary size.
      require_actions: every line must have actions.
    Raises:
      FileNotFoundError / ValueError naming ``path`` (and ``path:line`` for a bad line).
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"prompt file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path!r}: {e}") from e
    out = []
    for n, line in enumerate(raw, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        prompt, sep, acts = s.partition("|")
        prompt = prompt.strip()
        if not prompt:
            raise _bad(path, n, f"empty prompt in {line!r}")
        actions = None
        if sep:
            try:
                actions = parse_actions(acts, num_actions)
            except ValueError as e:
                raise _bad(path, n, f"{e} in {line!r}") from None
            if num_frames is not None and len(actions) != num_frames:
                raise _bad(path, n, f"{len(actions)} actions given, expected one per frame ({num_frames})")
        elif require_actions:
            raise _bad(path, n, f"no actions (expected 'PROMPT | a0 a1 ...') in {line!r}")
        out.append(PromptLine(prompt, actions, n))
    if not out:
        raise ValueError(f"prompt file {path!r} has no prompts")
    return out


def parse_toy_prompt(text: str, cfg: tw.ToyWorldConfig) -> tuple[int, int]:
    """``"scene=1 color=3"`` (colour id or name) -> ``(scene_id, colour_id)``."""
    kv = {}
    for tok in text.split():
        k, eq, v = tok.partition("=")
        if not eq or k not in ("scene", "color") or k in kv:
            raise ValueError(f"toy prompt must be 'scene=<id> color=<id|name>', got {text!r}")
        kv[k] = v
    if set(kv) != {"scene", "color"}:
        raise ValueError(f"toy prompt must set both scene and color, got {text!r}")
    try:
        scene = int(kv["scene"])
    except ValueError:
        raise ValueError(f"scene {kv['scene']!r} is not an integer") from None
    c = kv["color"].lower()
    color = tw.PALETTE_NAMES.index(c) if c in tw.PALETTE_NAMES else None
    if color is None:
        try:
            color = int(c)
        except ValueError:
            raise ValueError(f"color {kv['color']!r} is neither an id nor one of {tw.PALETTE_NAMES}") from None
    if not 0 <= scene < cfg.num_scenes:
        raise ValueError(f"scene {scene} out of range [0, {cfg.num_scenes})")
    if not 0 <= color < len(tw.PALETTE):
        raise ValueError(f"color {color} out of range [0, {len(tw.PALETTE)})")
    return scene, color


def toy_prompt_text(scene: int, color: int) -> str:
    """Inverse of :func:`parse_toy_prompt`: ``"scene=1 color=3"``."""
    return f"scene={int(scene)} color={int(color)}"


def read_toy_prompt_file(path: str, cfg: tw.ToyWorldConfig) -> list[tuple[PromptLine, int, int]]:
    """Parse a toy prompt file: ``[(line, scene, colour)]``; actions, if given, have one id per
    frame (``cfg.num_frames``). Bad lines -> ``ValueError`` naming ``path:line``."""
    out = []
    for pl in read_prompt_file(path, num_frames=cfg.num_frames):
        try:
            scene, color = parse_toy_prompt(pl.prompt, cfg)
        except ValueError as e:
            raise _bad(path, pl.line, str(e)) from None
        out.append((pl, scene, color))
    return out
