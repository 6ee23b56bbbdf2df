"""Convert a dataset of the earlier ``CRMR`` record format (metadata version 1) to the TFDS layout.

    python -m crm_jax.data.upgrade OLD_DIR NEW_DIR

The old directory is only read. Samples, text fields, ``source`` and dataset-wide values
(``ode_times``, ``num_actions``) carry over unchanged; the new directory is a complete,
checksummed dataset that :class:`crm_jax.data.dataset.DatasetSource` and TFDS read.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys

import numpy as np

from crm_jax.data import dataset as ds

_MAGIC = b"CRMR"


def decode_v1_record(data: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A version-1 record: ``b"CRMR" | uint32 header length | JSON header | raw array bytes``."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise ds.DatasetError(f"{where}: not a version-1 crm_jax record (bad magic {bytes(data[:4])!r})")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise ds.DatasetError(f"{where}: corrupt record header: {e}") from e
    base, arrays = 8 + n, {}
    for name, (dt, shape, off, nbytes) in header["a"].items():
        if base + off + nbytes > len(data):
            raise ds.DatasetError(f"{where}: truncated record (field {name!r})")
        arrays[name] = np.frombuffer(data, ds.dtype_from_name(dt), count=math.prod(shape), offset=base + off).reshape(
            shape
        )
    return arrays, header["t"]


def upgrade(old: str, new: str, progress: bool = True) -> dict:
    """Rewrite the version-1 dataset ``old`` as a TFDS-layout dataset in ``new``; returns its metadata."""
    from array_record.python.array_record_module import ArrayRecordReader

    fn = os.path.join(old, ds.METADATA)
    try:
        with open(fn) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ds.DatasetError(f"cannot read {fn!r}: {e}") from e
    if meta.get("format") != ds.FORMAT or meta.get("version") != 1:
        raise ds.DatasetError(f"{fn!r} is not a version-1 crm_jax dataset (version {meta.get('version')!r})")
    if not meta.get("complete"):
        raise ds.DatasetError(f"{fn!r}: the old dataset is incomplete; finish it with the old code first")
    feats = {k: ds.Feature(tuple(f["shape"]), f["dtype"]) for k, f in meta["features"].items()}
    keys = ("format", "version", "num_samples", "samples_per_shard", "features", "text_fields", "shards", "source")
    extra = {k: v for k, v in meta.items() if k not in (*keys, "complete")}
    plan = ds.make_metadata(
        num_samples=meta["num_samples"],
        samples_per_shard=meta["samples_per_shard"],
        features=feats,
        text_fields=meta.get("text_fields", []),
        source=meta.get("source"),
        extra=extra,
    )
    old_files = [os.path.join(old, s["file"]) for s in meta["shards"]]

    def example(i: int) -> dict:
        sf = old_files[i // meta["samples_per_shard"]]
        r = ArrayRecordReader(sf)
        try:
            rec = r.read([i % meta["samples_per_shard"]])[0]
        finally:
            r.close()
        arrays, text = decode_v1_record(rec, f"{sf!r} record {i % meta['samples_per_shard']}")
        return {**arrays, **{k: text.get(k, "") for k in plan["text_fields"]}}

    writer = ds.ShardWriter(new, plan, 0, 1)
    neg = os.path.join(old, ds.NEGATIVE)
    if os.path.exists(neg):
        writer.write_negative_context(np.load(neg))
    ds.write_records(writer, example, progress=progress, desc="upgrade")
    return ds.open_dataset(new)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0].startswith("-"):
        print("usage: python -m crm_jax.data.upgrade OLD_DIR NEW_DIR", file=sys.stderr)
        return 2
    try:
        meta = upgrade(*argv)
    except ds.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {meta['num_samples']} samples in {len(meta['shards'])} shards to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
