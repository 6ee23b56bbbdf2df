"""Per-frame action ids for world models: validation and per-chunk sources.

Actions are integer ids in `[0, num_actions)` (toy world: STAY/UP/DOWN/LEFT/RIGHT
= 0..4, names in `crm_jax.data.toy_world.ACTION_NAMES`). A chunk of `f` frames
takes actions `[B, f]` (a `[f]` vector is broadcast over the batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def check_actions(actions, batch: int, frames: int, num_actions: int, where: str = "actions") -> np.ndarray:
    """Validate per-frame action ids; returns int32 `[batch, frames]`.

    Raises ValueError for a wrong shape, non-integers or ids outside `[0, num_actions)`.
    """
    if num_actions <= 0:
        raise ValueError(f"{where}: actions given but the model has no action embedding (num_actions=0)")
    a = np.asarray(actions)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError(f"{where}: action ids must be integers, got {a.tolist()}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"{where}: action ids must be integers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = np.broadcast_to(a, (batch, a.shape[0]))
    if a.ndim != 2 or a.shape != (batch, frames):
        raise ValueError(
            f"{where}: expected {frames} action ids per frame ([{frames}] or [B={batch}, {frames}]), "
            f"got shape {tuple(np.shape(actions))}"
        )
    bad = (a < 0) | (a >= num_actions)
    if bad.any():
        raise ValueError(
            f"{where}: action id {int(a[bad][0])} is outside the vocabulary [0, {num_actions}) of this model"
        )
    return a.astype(np.int32)


class ActionSource:
    """Per-chunk actions from None, an array, a callback or an iterator.

    * None: no actions.
    * array `[T]` / `[B, T]` (T >= the frames generated): sliced per chunk.
    * callable `fn(chunk_index, start, num_frames) -> [f] | [B, f]` (interactive use).
    * iterable yielding one `[f]` / `[B, f]` entry per chunk.
    `live` is True for callbacks/iterators: those are only asked for a chunk's
    actions when that chunk is about to be computed.
    """

    def __init__(self, actions: Any, batch: int, num_actions: int):
        self.batch, self.num_actions = batch, num_actions
        self.array = self.fn = self.it = None
        if actions is None:
            pass
        elif callable(actions):
            self.fn = actions
        elif isinstance(actions, (np.ndarray, list, tuple)) or hasattr(actions, "__array__"):
            a = np.asarray(actions)
            if a.ndim not in (1, 2):
                raise ValueError(f"actions must be [T] or [B, T] ids, got shape {a.shape}")
            self.array = a
        elif isinstance(actions, Iterable):
            self.it = iter(actions)
        else:
            raise ValueError(f"actions must be None, an array, a callable or an iterable, got {type(actions).__name__}")
        if actions is not None and num_actions <= 0:
            raise ValueError("actions given but the model has no action embedding (num_actions=0)")

    @property
    def live(self) -> bool:
        return self.fn is not None or self.it is not None

    def check_length(self, num_frames: int | None):
        if self.array is not None:
            have = self.array.shape[-1]
            if num_frames is None or have < num_frames:
                raise ValueError(
                    f"actions cover {have} frames but {num_frames or 'an endless stream of'} frames were requested"
                )

    def get(self, index: int, start: int, end: int) -> np.ndarray | None:
        """Actions `[B, end - start]` int32 for a chunk (None when there are none)."""
        where = f"actions of chunk {index} (frames {start}..{end - 1})"
        if self.array is not None:
            a = self.array[..., start:end]
        elif self.fn is not None:
            a = self.fn(index, start, end - start)
        elif self.it is not None:
            try:
                a = next(self.it)
            except StopIteration:
                raise ValueError(f"{where}: the action iterator ran out") from None
        else:
            return None
        return check_actions(a, self.batch, end - start, self.num_actions, where)


def parse_action_tokens(tokens: Sequence[str], names: Sequence[str], num_actions: int) -> list[int]:
    """Action names (case-insensitive) or ids -> ids; ValueError naming the bad token."""
    lower = [n.lower() for n in names]
    out = []
    for tok in tokens:
        t = tok.strip().lower()
        if t in lower and lower.index(t) < num_actions:
            out.append(lower.index(t))
            continue
        try:
            i = int(t)
        except ValueError:
            raise ValueError(
                f"unknown action {tok!r}; known: {', '.join(names[:num_actions])} or ids 0..{num_actions - 1}"
            ) from None
        if not 0 <= i < num_actions:
            raise ValueError(f"action id {i} is outside the vocabulary [0, {num_actions})")
        out.append(i)
    return out
