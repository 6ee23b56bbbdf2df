"""Assemble checked, nested parameter dicts from converted checkpoint weights.

Shared by the transformer-style converters (Wan DiT, umT5; the VAE's uses the error): weights of scanned
layers arrive one layer at a time and are stacked along a leading layer axis;
everything is checked against the model's abstract parameters, and any missing,
unexpected or mis-shaped entry is one ValueError that names them.
"""

from __future__ import annotations

import numpy as np


def raise_if_mismatch(what: str, missing: list, unexpected: list, bad_shape: list) -> None:
    """One ValueError headed `what` listing missing, unexpected and mis-shaped entries (if any)."""
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{what}:\n"
            + (f"  missing ({len(missing)}): {missing[:20]}\n" if missing else "")
            + (f"  unexpected ({len(unexpected)}): {unexpected[:20]}\n" if unexpected else "")
            + (f"  wrong shape ({len(bad_shape)}): {bad_shape[:20]}\n" if bad_shape else "")
        )


def assemble_params(
    flat: dict,
    stacks: dict,
    expected: dict,
    dtypes: dict,
    *,
    num_layers: int,
    unexpected: list,
    layer_prefix: str,
    what: str,
) -> dict:
    """Stack, check and nest converted weights.

    Args:
      flat: {param path tuple: array} of unstacked parameters.
      stacks: {param path tuple: {layer index: array}} of per-layer parameters.
      expected / dtypes: {param path tuple: shape / dtype} of the model's parameters.
      num_layers: layers every stacked parameter must have.
      unexpected: checkpoint keys already found to have no place in the model.
      layer_prefix: the checkpoint's name of layer i without the index (e.g. "blocks"),
        for naming missing per-layer keys.
      what: the error message's first line ("Wan checkpoint does not match the model config").
    Returns:
      the nested parameter dict, each leaf cast to the model's dtype.
    """
    flat = dict(flat)
    missing, bad_shape = [], []
    for path, layers in stacks.items():
        absent = [i for i in range(num_layers) if i not in layers]
        if absent:
            missing += [f"{layer_prefix}.{i}.<{'.'.join(path[1:])}>" for i in absent]
            continue
        shapes = {tuple(w.shape) for w in layers.values()}
        if len(shapes) > 1:
            bad_shape.append(f"{'/'.join(path)}: layers disagree {sorted(shapes)}")
            continue
        flat[path] = np.stack([layers[i] for i in range(num_layers)])
    for path, shape in expected.items():
        if path not in flat:
            if not any(m.endswith(f"<{'.'.join(path[1:])}>") for m in missing):
                missing.append("/".join(path))
        elif tuple(flat[path].shape) != tuple(shape):
            bad_shape.append(f"{'/'.join(path)}: checkpoint {tuple(flat[path].shape)} vs model {tuple(shape)}")
    raise_if_mismatch(what, missing, unexpected, bad_shape)
    nested: dict = {}
    for path, w in flat.items():
        d = nested
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = w.astype(dtypes[path])
    return nested
