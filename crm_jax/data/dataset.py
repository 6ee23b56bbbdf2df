"""Synthetic-data datasets on disk: ArrayRecord shards + a JSON metadata file.

Layout of a dataset directory::

    metadata.json                            format, features, shards, teacher/model identity
    data-00000-of-00004.array_record         records of samples [0, S)
    data-00001-of-00004.array_record         records of samples [S, 2S)   (S = samples_per_shard)
    ...
    negative_context.npy                     optional: CFG's negative-prompt embedding [L, D]

Every record is one sample, a dict of named numpy arrays encoded by :func:`encode_record`
(bit-exact, any dtype incl. bfloat16) plus optional text fields (e.g. ``prompt``). Sample
``i`` always lives in shard ``i // S`` at position ``i % S`` and carries ``id = i``.
Standard features (channels last, per sample)::

    id        []               int64    global sample index
    latents   [T, H, W, C]     float32 / bfloat16
    context   [L, D]           float32 / bfloat16 (text embeddings; umT5: [512, 4096])
    actions   [T]              int32    (world models; optional)
    ode_traj  [K, T, H, W, C]  teacher ODE states at metadata["ode_times"] (optional)

Writing (:class:`ShardWriter`) is resumable: a shard is written under a hidden temporary
name and renamed atomically when complete, so a crash loses at most the shard in progress,
and a restart skips complete shards. ``metadata.json`` is created (atomically, once) before
any shard and marked ``"complete": true`` when every shard exists.

Reading (:class:`DatasetSource`) goes through ``grain`` (``ArrayRecordDataSource`` ->
``MapDataset``): one seeded, per-epoch shuffled stream of all samples, global batches as
consecutive pieces of it, each process reading only its rows of every global batch
(:func:`crm_jax.distributed.process_rows`), all by random access (``batch(step)`` is a pure
function of ``step``), and iterators whose state (``get_state()``, a small JSON-able dict)
is saved in checkpoints.

Several processes split the work by the same rule (:func:`crm_jax.distributed.process_rows`):
process ``p`` of ``P`` writes the contiguous block ``process_rows(num_shards, p, P)`` of shards,
and reads rows ``process_rows(batch_size, p, P)`` of every global batch.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from crm_jax.distributed import local_batch_size, process_rows

FORMAT = "crm_jax.synthetic_dataset"
VERSION = 1
METADATA = "metadata.json"
NEGATIVE = "negative_context.npy"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access
_MAGIC = b"CRMR"


class DatasetError(ValueError):
    """A dataset directory or file that cannot be used (the message names the file)."""


# ----------------------------------------------------------------------------- dtypes


def dtype_from_name(name: str) -> np.dtype:
    """numpy dtype from its name (e.g. "float32"), including ``bfloat16`` (via ml_dtypes)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def dtype_name(dt) -> str:
    return np.dtype(dt).name


# ----------------------------------------------------------------------------- records


def encode_record(arrays: dict[str, np.ndarray], text: dict[str, str] | None = None) -> bytes:
    """Serialise named arrays (+ text fields) into one record.

    Layout: ``b"CRMR" | uint32 header length | JSON header | raw array bytes``; the header
    maps each name to ``[dtype, shape, offset, nbytes]`` and holds the text fields.
    Round trip through :func:`decode_record` is bit-identical.
    """
    header, blobs, off = {"a": {}, "t": dict(text or {})}, [], 0
    for name, a in arrays.items():
        a = np.asarray(a)
        b = a.tobytes(order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        header["a"][name] = [dtype_name(a.dtype), list(a.shape), off, len(b)]
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([_MAGIC, struct.pack("<I", len(h)), h, *blobs])


def decode_record(data: bytes, where: str = "record") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Inverse of :func:`encode_record`: ``(arrays, text)``. ``where`` names it in errors."""
    if len(data) < 8 or data[:4] != _MAGIC:
        raise DatasetError(f"{where}: not a crm_jax dataset record (bad magic {bytes(data[:4])!r})")
    (n,) = struct.unpack("<I", data[4:8])
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise DatasetError(f"{where}: corrupt record header: {e}") from e
    base, arrays = 8 + n, {}
    for name, (dt, shape, off, nbytes) in header["a"].items():
        if base + off + nbytes > len(data):
            raise DatasetError(f"{where}: truncated record (field {name!r})")
        arrays[name] = np.frombuffer(data, dtype_from_name(dt), count=math.prod(shape), offset=base + off).reshape(
            shape
        )
    return arrays, header["t"]


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class Feature:
    """Per-sample shape and dtype name of one stored array."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self):
        return {"shape": list(self.shape), "dtype": self.dtype}


def shard_name(j: int, n: int, prefix: str = "data") -> str:
    return f"{prefix}-{j:05d}-of-{n:05d}.array_record"


def make_metadata(
    *,
    num_samples: int,
    samples_per_shard: int,
    features: dict[str, Feature],
    text_fields: Sequence[str] = (),
    source: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The metadata dict of a dataset plan (``complete`` False until every shard exists).

    ``source`` identifies how the data was made (teacher checkpoint, model config, sampler
    settings or the converted directory); ``extra`` holds dataset-wide values such as
    ``ode_times`` ([K] floats) or ``num_actions``.
    """
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"num_samples ({num_samples}) and samples_per_shard ({samples_per_shard}) must be >= 1")
    n = math.ceil(num_samples / samples_per_shard)
    shards = [
        {
            "file": shard_name(j, n),
            "first_id": j * samples_per_shard,
            "num_records": min(samples_per_shard, num_samples - j * samples_per_shard),
        }
        for j in range(n)
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": int(num_samples),
        "samples_per_shard": int(samples_per_shard),
        "features": {k: f.to_json() for k, f in features.items()},
        "text_fields": list(text_fields),
        "shards": shards,
        "source": source or {},
        **(extra or {}),
        "complete": False,
    }


def _atomic_write_json(path: str, obj: dict, exclusive: bool = False) -> bool:
    """Write JSON via a temp file + rename. ``exclusive``: only if ``path`` does not exist
    (atomic create-if-absent); returns False when it already existed."""
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if exclusive:
        try:
            os.link(tmp, path)  # atomic create-if-absent
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links: best effort
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return True
    os.replace(tmp, path)
    return True


def read_metadata(path: str) -> dict:
    """Parse and check ``path/metadata.json``; raise :class:`DatasetError` naming the file."""
    if not os.path.isdir(path):
        raise DatasetError(f"dataset directory {path!r} does not exist or is not a directory")
    fn = os.path.join(path, METADATA)
    if not os.path.exists(fn):
        raise DatasetError(
            f"{fn!r} not found: {path!r} is not a crm_jax dataset directory "
            f"(make one with `python -m crm_jax.data.generate` or `crm_jax.data.external`)"
        )
    try:
        with open(fn) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"cannot read dataset metadata {fn!r}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(
            f"{fn!r} is not crm_jax dataset metadata (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})"
        )
    if meta.get("version") != VERSION:
        raise DatasetError(f"{fn!r}: dataset format version {meta.get('version')!r}, this code reads {VERSION}")
    for k in ("num_samples", "samples_per_shard", "features", "shards"):
        if k not in meta:
            raise DatasetError(f"{fn!r}: missing key {k!r}")
    return meta


def plan_key(meta: dict) -> dict:
    """The part of the metadata that must agree between a run and its restart."""
    return {k: v for k, v in meta.items() if k != "complete"}


# ----------------------------------------------------------------------------- writing


def host_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """Shards written by one process: its block ``process_rows(num_shards, p, P)`` of them."""
    return list(range(*process_rows(num_shards, process_index, process_count)))


class ShardWriter:
    """Resumable, multi-host writer of one dataset directory.

    Args:
      path: dataset directory (created if absent).
      meta: the plan from :func:`make_metadata`. If ``path`` already holds a dataset, its plan
        must be identical (otherwise :class:`DatasetError`: nothing is overwritten). A
        non-empty directory without ``metadata.json`` is refused as foreign.
      process_index / process_count: this host and the number of hosts (default: JAX's).
    """

    def __init__(self, path: str, meta: dict, process_index: int | None = None, process_count: int | None = None):
        import jax

        self.path = path
        self.meta = meta
        self.pi = jax.process_index() if process_index is None else int(process_index)
        self.pc = jax.process_count() if process_count is None else int(process_count)
        mfile = os.path.join(path, METADATA)
        if not os.path.exists(mfile):  # (another process may create it meanwhile: checked below)
            if os.path.isdir(path) and any(not n.startswith(".") and n != METADATA for n in os.listdir(path)):
                raise DatasetError(
                    f"output directory {path!r} is not empty and has no {METADATA}: "
                    f"refusing to write a dataset into a foreign directory"
                )
            os.makedirs(path, exist_ok=True)
            _atomic_write_json(mfile, meta, exclusive=True)
        old, new = read_metadata(path), json.loads(json.dumps(meta))
        if plan_key(old) != plan_key(new):
            diff = sorted(k for k in set(old) | set(new) if k != "complete" and old.get(k) != new.get(k))
            raise DatasetError(
                f"{mfile!r} describes a different dataset (differs in {diff}); "
                f"refusing to mix: use a new output directory or the same settings"
            )

    @property
    def shards(self) -> list[dict]:
        return self.meta["shards"]

    def pending(self) -> list[int]:
        """This host's shards that are not complete yet (complete = final file exists)."""
        return [
            j
            for j in host_shards(len(self.shards), self.pi, self.pc)
            if not os.path.exists(os.path.join(self.path, self.shards[j]["file"]))
        ]

    def write_shard(self, j: int, records: Iterable[bytes]) -> None:
        """Write shard ``j`` from exactly ``num_records`` encoded records (temp name, then rename)."""
        from array_record.python.array_record_module import ArrayRecordWriter

        info = self.shards[j]
        final = os.path.join(self.path, info["file"])
        tmp = os.path.join(self.path, f".{info['file']}.tmp-p{self.pi}")
        for old in glob.glob(os.path.join(glob.escape(self.path), f".{info['file']}.tmp-*")):
            os.remove(old)  # leftover of a crash (by any host layout): redo this shard
        w = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        n = 0
        try:
            for rec in records:
                w.write(rec)
                n += 1
        finally:
            w.close()
        if n != info["num_records"]:
            os.remove(tmp)
            raise RuntimeError(f"shard {info['file']}: got {n} records, expected {info['num_records']}")
        os.replace(tmp, final)

    def finalize(self) -> bool:
        """Mark the dataset complete if every shard exists (any host may do it). Returns it."""
        missing = [s["file"] for s in self.shards if not os.path.exists(os.path.join(self.path, s["file"]))]
        if missing:
            return False
        _atomic_write_json(os.path.join(self.path, METADATA), {**self.meta, "complete": True})
        return True

    def write_negative_context(self, neg: np.ndarray) -> None:
        fn = os.path.join(self.path, NEGATIVE)
        tmp = os.path.join(self.path, f".{NEGATIVE}.tmp-p{self.pi}.npy")
        np.save(tmp, np.asarray(neg))
        os.replace(tmp, fn)


# ----------------------------------------------------------------------------- reading


def open_dataset(path: str, *, require_complete: bool = True, check_files: bool = True) -> dict:
    """Read and validate a dataset directory; return its metadata.

    Checks: metadata readable and ours, generation complete, every shard present, readable
    as ArrayRecord and holding the planned number of records, and the first record of the
    first shard matching the declared features. Errors name the offending file.
    """
    meta = read_metadata(path)
    fn = os.path.join(path, METADATA)
    if require_complete and not meta.get("complete"):
        missing = [s["file"] for s in meta["shards"] if not os.path.exists(os.path.join(path, s["file"]))]
        raise DatasetError(
            f"{fn!r}: dataset is incomplete ({len(missing)} of {len(meta['shards'])} shards "
            f"missing, e.g. {missing[:3]}); rerun the generation command to resume it"
        )
    if check_files:
        from array_record.python.array_record_module import ArrayRecordReader

        for s in meta["shards"]:
            sf = os.path.join(path, s["file"])
            if not os.path.exists(sf):
                raise DatasetError(f"shard {sf!r} listed in {fn!r} is missing")
            try:
                r = ArrayRecordReader(sf)
                n = r.num_records()
                first = r.read([0])[0] if s is meta["shards"][0] and n else None
                r.close()
            except Exception as e:  # array_record raises RuntimeError/ValueError on bad files
                raise DatasetError(f"cannot read shard {sf!r} as ArrayRecord: {e}") from e
            if n != s["num_records"]:
                raise DatasetError(f"shard {sf!r} holds {n} records, {fn!r} says {s['num_records']}")
            if first is not None:
                arrays, _ = decode_record(first, f"{sf!r} record 0")
                check_record(arrays, meta, f"{sf!r} record 0")
    return meta


def check_record(arrays: dict[str, np.ndarray], meta: dict, where: str) -> None:
    """Every declared feature present with its shape and dtype."""
    for name, f in meta["features"].items():
        if name not in arrays:
            raise DatasetError(f"{where}: feature {name!r} missing (has {sorted(arrays)})")
        a = arrays[name]
        if list(a.shape) != list(f["shape"]) or dtype_name(a.dtype) != f["dtype"]:
            raise DatasetError(
                f"{where}: feature {name!r} is {dtype_name(a.dtype)}{list(a.shape)}, "
                f"metadata says {f['dtype']}{f['shape']}"
            )


def check_model_compat(meta: dict, mcfg, path: str = "") -> None:
    """Raise :class:`DatasetError` (naming the metadata file) if the dataset's shapes do not
    fit the model config ``mcfg`` (a ``WanConfig``): latent channels, patch divisibility,
    text embedding ``[text_len, text_dim]``, action ids < ``num_actions``."""
    fn = os.path.join(path, METADATA) if path else METADATA
    feats = meta["features"]
    for k in ("latents", "context"):
        if k not in feats:
            raise DatasetError(f"{fn!r}: dataset has no {k!r} feature (has {sorted(feats)})")
    T, H, W, C = feats["latents"]["shape"]
    pt, ph, pw = mcfg.patch_size
    if C != mcfg.in_channels:
        raise DatasetError(
            f"{fn!r}: latents {feats['latents']['shape']} have {C} channels but the model "
            f"expects in_channels={mcfg.in_channels}"
        )
    if T % pt or H % ph or W % pw:
        raise DatasetError(
            f"{fn!r}: latents [T, H, W] = {[T, H, W]} not divisible by the model's patch_size {tuple(mcfg.patch_size)}"
        )
    if list(feats["context"]["shape"]) != [mcfg.text_len, mcfg.text_dim]:
        raise DatasetError(
            f"{fn!r}: context embeddings are {feats['context']['shape']} but the model "
            f"expects [text_len, text_dim] = {[mcfg.text_len, mcfg.text_dim]}"
        )
    if mcfg.num_actions > 0:
        if "actions" not in feats:
            raise DatasetError(
                f"{fn!r}: the model takes actions (num_actions={mcfg.num_actions}) but the dataset has none"
            )
        if meta.get("num_actions", 0) > mcfg.num_actions:
            raise DatasetError(
                f"{fn!r}: dataset action ids go up to {meta['num_actions'] - 1} but the model "
                f"has num_actions={mcfg.num_actions}"
            )
        if feats["actions"]["shape"] != [T]:
            raise DatasetError(f"{fn!r}: actions {feats['actions']['shape']} must be [T] = [{T}]")


class _Decode:
    """grain map: record bytes -> dict of arrays (only ``fields``)."""

    def __init__(self, fields: Sequence[str]):
        self.fields = tuple(fields)

    def __call__(self, data: bytes) -> dict:
        arrays, _ = decode_record(data)
        return {k: arrays[k] for k in self.fields}


class DatasetSource:
    """Training batches from a dataset directory (same interface as ``ToySource``).

    ``batch(step)`` returns this host's part of global batch ``step``: a dict of numpy arrays
    with leading dim ``b = batch_size // process_count`` (``latents [b, T, H, W, C]``,
    ``context [b, L, D]``, ``actions [b, T]`` (if stored and the model takes actions),
    ``ode_traj [b, K, T, H, W, C]`` and ``ode_times [K]`` (if stored), ``id [b]``).

    The sample stream is the whole dataset, each epoch shuffled with a permutation derived
    from ``(seed, epoch)`` (``shuffle=False``: in order), epochs repeating forever. Global batch
    ``step`` is stream elements ``[step * B, (step + 1) * B)`` (it may straddle an epoch end),
    whatever the number of processes; process ``p`` of ``P`` reads only its rows
    ``crm_jax.distributed.process_rows(B, p, P)`` of it. Everything is random access, so
    ``batch(step)`` is a pure function of ``step`` and the iterator state is ``{"step": step}``.

    Args:
      path: dataset directory. mcfg: optional ``WanConfig`` to validate shapes against.
      batch_size: global batch size (divisible by ``process_count``).
      fields: stored features to return (default: all the training ones present).
    """

    def __init__(
        self,
        path: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        mcfg=None,
        process_index: int | None = None,
        process_count: int | None = None,
        fields: Sequence[str] | None = None,
        check_files: bool = True,
    ):
        import grain.python as gp
        import jax

        self.path = path
        self.meta = open_dataset(path, check_files=check_files)
        if mcfg is not None:
            check_model_compat(self.meta, mcfg, path)
        self.pi = jax.process_index() if process_index is None else int(process_index)
        self.pc = jax.process_count() if process_count is None else int(process_count)
        self.batch_size, self.local_batch_size = batch_size, local_batch_size(batch_size, self.pc)
        feats = self.meta["features"]
        if fields is None:
            fields = [k for k in ("id", "latents", "context", "actions", "ode_traj") if k in feats]
            if mcfg is not None and mcfg.num_actions == 0 and "actions" in fields:
                fields.remove("actions")  # the model has no action embedding
        missing = [k for k in fields if k not in feats]
        if missing:
            raise DatasetError(
                f"{os.path.join(path, METADATA)!r}: requested fields {missing} not stored (has {sorted(feats)})"
            )
        self.fields = tuple(fields)
        self.rows = process_rows(batch_size, self.pi, self.pc)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        src = gp.ArrayRecordDataSource([os.path.join(path, s["file"]) for s in self.meta["shards"]])
        ds = gp.MapDataset.source(src)
        if shuffle:
            ds = ds.shuffle(seed=self.seed)
        self._records = ds.repeat().map(_Decode(self.fields))
        self._ode_times = np.asarray(self.meta["ode_times"], np.float32) if "ode_traj" in self.fields else None

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.meta["features"]["latents"]["shape"])

    def sample(self, k: int) -> dict:
        """Element ``k`` of the (shuffled, repeated) sample stream."""
        return self._records[k]

    def batch(self, step: int) -> dict:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        first = step * self.batch_size
        recs = [self._records[first + r] for r in range(*self.rows)]
        out = {k: np.stack([r[k] for r in recs]) for k in self.fields}
        if self._ode_times is not None:
            out["ode_times"] = self._ode_times
        return out

    def negative_context(self) -> np.ndarray:
        """CFG's negative-prompt embedding ``[L, D]`` stored with the dataset."""
        fn = os.path.join(self.path, NEGATIVE)
        if not os.path.exists(fn):
            raise DatasetError(
                f"{fn!r} not found: the dataset stores no negative-prompt embedding "
                f"(pass one to the generator/converter)"
            )
        try:
            neg = np.load(fn)
        except Exception as e:
            raise DatasetError(f"cannot read {fn!r}: {e}") from e
        want = self.meta["features"]["context"]["shape"]
        if list(neg.shape) != list(want):
            raise DatasetError(f"{fn!r} has shape {list(neg.shape)}, expected context shape {want}")
        return neg

    def iterator(self, state: dict | None = None) -> DatasetIterator:
        """A batch iterator starting at ``state`` (from ``get_state()``) or step 0."""
        it = DatasetIterator(self)
        if state is not None:
            it.set_state(state)
        return it


class DatasetIterator:
    """Iterator over ``source.batch(step)``; ``get_state()``/``set_state()`` round-trip exactly.

    The state is a JSON-able dict ``{"step", "seed", "process_index", "process_count",
    "num_samples"}``; restoring it into a source with different seed/sharding/size raises.
    """

    def __init__(self, source: DatasetSource):
        self.source, self.step = source, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.source.batch(self.step)
        self.step += 1
        return b

    def _ident(self) -> dict:
        s = self.source
        return {
            "seed": s.seed,
            "shuffle": s.shuffle,
            "process_index": s.pi,
            "process_count": s.pc,
            "num_samples": s.meta["num_samples"],
            "batch_size": s.batch_size,
        }

    def get_state(self) -> dict:
        return {"step": self.step, **self._ident()}

    def set_state(self, state: dict) -> None:
        ident = self._ident()
        bad = {k: (state.get(k), v) for k, v in ident.items() if state.get(k) != v}
        if bad:
            raise ValueError(f"iterator state does not match this source: {bad} (saved, current)")
        self.step = int(state["step"])


def read_all(path: str, fields: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Every sample of a dataset in id order, stacked: ``({name: [N, ...]}, [text fields per sample])``."""
    from array_record.python.array_record_module import ArrayRecordReader

    meta = open_dataset(path)
    cols, texts = {}, []
    for s in meta["shards"]:
        sf = os.path.join(path, s["file"])
        r = ArrayRecordReader(sf)
        recs = r.read_all()
        r.close()
        for i, rec in enumerate(recs):
            arrays, text = decode_record(rec, f"{sf!r} record {i}")
            for k, v in arrays.items():
                if fields is None or k in fields:
                    cols.setdefault(k, []).append(v)
            texts.append(text)
    return {k: np.stack(v) for k, v in cols.items()}, texts


def write_records(
    writer: ShardWriter, make_record: Callable[[int], bytes], progress: bool = False, desc: str = "writing"
) -> int:
    """Write this host's pending shards from ``make_record(sample_id) -> bytes``; returns shards written."""
    from tqdm import tqdm

    todo = writer.pending()
    total = sum(writer.shards[j]["num_records"] for j in todo)
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for j in todo:
            s = writer.shards[j]

            def gen(s=s):
                for i in range(s["first_id"], s["first_id"] + s["num_records"]):
                    yield make_record(i)
                    bar.update(1)

            writer.write_shard(j, gen())
    writer.finalize()
    return len(todo)
