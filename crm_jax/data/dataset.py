"""Datasets on disk in the TFDS layout (ArrayRecord shards), plus this project's plan file.

Layout of a dataset directory::

    metadata.json                                    plan: features, shards, source, checksums, complete
    dataset_info.json, features.json                 TFDS metadata (written when the dataset is complete)
    synthetic-train.array_record-00000-of-00004      records of samples [0, S)
    synthetic-train.array_record-00001-of-00004      records of samples [S, 2S)   (S = samples_per_shard)
    ...
    negative_context.npy                             optional: CFG's negative-prompt embedding [L, D]

Every record is one sample encoded by TFDS (``FeaturesDict.serialize_example``): arrays as raw
bytes (any dtype incl. bfloat16, bit-exact) plus text fields (e.g. ``prompt``). Any TFDS reader
opens a complete dataset without TensorFlow::

    tfds.builder_from_directory(path).as_data_source()["train"][i]

Sample ``i`` lives in shard ``i // S`` at position ``i % S`` and carries ``id = i``. Standard
features (channels last, per sample)::

    id        []               int64    global sample index
    latents   [T, H, W, C]     float32 / bfloat16
    context   [L, D]           float32 / bfloat16 (text embeddings; umT5: [512, 4096])
    actions   [T]              int32    (world models; optional)
    ode_traj  [K, T, H, W, C]  teacher ODE states at metadata["ode_times"] (optional)

Writing (:class:`ShardWriter`) is resumable: a shard is written under a hidden temporary name,
its SHA-256 recorded, and then renamed into place, so a crash loses at most the shard in
progress. A restart rewrites every shard that is missing or does not match its checksum.
``metadata.json`` is created (atomically, once) before any shard and marked
``"complete": true``, with every shard's checksum, when all shards exist.

Opening (:func:`open_dataset`) checks the plan, every shard's size and checksum, and the first
record against the declared features; every error names the file. Datasets in the earlier
``CRMR`` record format are refused with the command that converts them
(``python -m crm_jax.data.upgrade OLD NEW``).

Reading (:class:`DatasetSource`) goes through TFDS's data source API and ``grain``
(``MapDataset``): one seeded, per-epoch shuffled stream of all samples, global batches as
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
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from crm_jax.distributed import local_batch_size, process_rows
from crm_jax.errors import CrmError

FORMAT = "crm_jax.synthetic_dataset"
VERSION = 2  # 1: the CRMR record format (crm_jax/data/upgrade.py converts it)
METADATA = "metadata.json"
NEGATIVE = "negative_context.npy"
TFDS_NAME, TFDS_SPLIT = "synthetic", "train"
TFDS_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access


class DatasetError(CrmError, ValueError):
    """A dataset directory or file that cannot be used (the message names the file; exit code 1)."""


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


def tfds_features(meta: dict):
    """The ``tfds.features.FeaturesDict`` of a plan: arrays stored as raw bytes, text as strings."""
    import tensorflow_datasets as tfds

    spec = {}
    for name, f in meta["features"].items():
        if f["shape"]:
            spec[name] = tfds.features.Tensor(
                shape=tuple(f["shape"]), dtype=dtype_from_name(f["dtype"]), encoding=tfds.features.Encoding.BYTES
            )
        else:
            spec[name] = tfds.features.Scalar(dtype=dtype_from_name(f["dtype"]))
    for name in meta.get("text_fields", ()):
        spec[name] = tfds.features.Text()
    return tfds.features.FeaturesDict(spec)


def example_encoder(meta: dict) -> Callable[[dict], bytes]:
    """``encode(example) -> bytes``: TFDS's encoding of one example (a ``tf.train.Example``),
    serialised deterministically (map entries sorted), so that the same sample gives the same bytes
    in every process."""
    from tensorflow_datasets.core.example_serializer import ExampleSerializer

    features = tfds_features(meta)
    serializer = ExampleSerializer(features.get_serialized_info())
    return lambda ex: serializer.get_tf_example(features.encode_example(ex)).SerializeToString(deterministic=True)


def split_example(example: dict, meta: dict) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A decoded TFDS example as ``(arrays, text fields)``; text decoded from UTF-8."""
    text = {k: example[k].decode() if isinstance(example[k], bytes) else str(example[k]) for k in meta["text_fields"]}
    return {k: np.asarray(example[k]) for k in meta["features"]}, text


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class Feature:
    """Per-sample shape and dtype name of one stored array."""

    shape: tuple[int, ...]
    dtype: str

    def to_json(self):
        return {"shape": list(self.shape), "dtype": self.dtype}


def shard_name(j: int, n: int) -> str:
    """File name of shard ``j`` of ``n`` (TFDS's naming of an ArrayRecord split)."""
    return f"{TFDS_NAME}-{TFDS_SPLIT}.array_record-{j:05d}-of-{n:05d}"


def is_shard(name: str) -> bool:
    return name.startswith(f"{TFDS_NAME}-{TFDS_SPLIT}.array_record-")


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    if meta.get("version") == 1:
        raise DatasetError(
            f"{fn!r}: {path!r} is in the old crm_jax record format (version 1); convert it to the TFDS "
            f"layout with `python -m crm_jax.data.upgrade {path} NEW_DIR`"
        )
    if meta.get("version") != VERSION:
        raise DatasetError(f"{fn!r}: dataset format version {meta.get('version')!r}, this code reads {VERSION}")
    for k in ("num_samples", "samples_per_shard", "features", "shards"):
        if k not in meta:
            raise DatasetError(f"{fn!r}: missing key {k!r}")
    return meta


def plan_key(meta: dict) -> dict:
    """The part of the metadata that must agree between a run and its restart."""
    return {k: v for k, v in meta.items() if k not in ("complete", "checksums")}


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

    def _checksum_file(self, j: int) -> str:
        return os.path.join(self.path, f".{self.shards[j]['file']}.sha256")

    def shard_ok(self, j: int) -> bool:
        """Shard ``j`` exists and matches the checksum recorded when it was written."""
        final = os.path.join(self.path, self.shards[j]["file"])
        try:
            with open(self._checksum_file(j)) as f:
                want = f.read().strip()
        except OSError:
            return False
        return os.path.exists(final) and file_sha256(final) == want

    def pending(self) -> list[int]:
        """This host's shards still to write: missing, or not matching their checksum (damaged)."""
        return [j for j in host_shards(len(self.shards), self.pi, self.pc) if not self.shard_ok(j)]

    def write_shard(self, j: int, examples: Iterable[dict]) -> None:
        """Write shard ``j`` from exactly ``num_records`` examples (dicts of the plan's features and
        text fields), TFDS-encoded, under a temporary name; record its checksum; rename it."""
        from array_record.python.array_record_module import ArrayRecordWriter

        info = self.shards[j]
        final = os.path.join(self.path, info["file"])
        tmp = os.path.join(self.path, f".{info['file']}.tmp-p{self.pi}")
        for old in glob.glob(os.path.join(glob.escape(self.path), f".{info['file']}.tmp-*")):
            os.remove(old)  # leftover of a crash (by any host layout): redo this shard
        encode = example_encoder(self.meta)
        w = ArrayRecordWriter(tmp, WRITER_OPTIONS)
        n = 0
        try:
            for ex in examples:
                w.write(encode(ex))
                n += 1
        finally:
            w.close()
        if n != info["num_records"]:
            os.remove(tmp)
            raise RuntimeError(f"shard {info['file']}: got {n} records, expected {info['num_records']}")
        digest = file_sha256(tmp)
        ck_tmp = f"{self._checksum_file(j)}.tmp-p{self.pi}"
        with open(ck_tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(ck_tmp, self._checksum_file(j))
        os.replace(tmp, final)

    def finalize(self) -> bool:
        """Mark the dataset complete if every shard is intact (any host may do it): write the TFDS
        metadata, then ``metadata.json`` with every shard's checksum. Returns whether it is complete."""
        import tensorflow_datasets as tfds

        if not all(self.shard_ok(j) for j in range(len(self.shards))):
            return False
        checksums = {}
        for j, s in enumerate(self.shards):
            with open(self._checksum_file(j)) as f:
                checksums[s["file"]] = f.read().strip()
        split = tfds.core.SplitInfo(
            name=TFDS_SPLIT,
            shard_lengths=[s["num_records"] for s in self.shards],
            num_bytes=sum(os.path.getsize(os.path.join(self.path, s["file"])) for s in self.shards),
        )
        tfds.folder_dataset.write_metadata(
            data_dir=self.path,
            features=tfds_features(self.meta),
            split_infos=[split],
            filename_template=TFDS_TEMPLATE,
            description="crm_jax dataset (metadata.json holds how it was made)",
            check_data=False,
        )
        _atomic_write_json(os.path.join(self.path, METADATA), {**self.meta, "checksums": checksums, "complete": True})
        return True

    def write_negative_context(self, neg: np.ndarray) -> None:
        fn = os.path.join(self.path, NEGATIVE)
        tmp = os.path.join(self.path, f".{NEGATIVE}.tmp-p{self.pi}.npy")
        np.save(tmp, np.asarray(neg))
        os.replace(tmp, fn)


# ----------------------------------------------------------------------------- reading


def open_dataset(path: str, *, require_complete: bool = True, check_files: bool = True) -> dict:
    """Read and validate a dataset directory; return its metadata.

    Checks: metadata readable and ours, generation complete, every shard present, of the
    recorded checksum (``check_files``), and the first record matching the declared features.
    Errors name the offending file and what to do.
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
        checksums = meta.get("checksums", {})
        for s in meta["shards"]:
            sf = os.path.join(path, s["file"])
            if not os.path.exists(sf):
                raise DatasetError(f"shard {sf!r} listed in {fn!r} is missing; rerun the generation command")
            if s["file"] in checksums and file_sha256(sf) != checksums[s["file"]]:
                raise DatasetError(
                    f"shard {sf!r} is damaged (its SHA-256 differs from the one recorded in {fn!r}); "
                    f"rerun the generation command to rewrite it"
                )
        if meta.get("complete") and meta["num_samples"]:
            where = f"{os.path.join(path, meta['shards'][0]['file'])!r} record 0"
            arrays, _ = split_example(_tfds_source(path, meta)[0], meta)
            check_record(arrays, meta, where)
    return meta


def _tfds_source(path: str, meta: dict):
    """TFDS's random-access data source of the dataset's split (records decoded to numpy)."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder_from_directory(path).as_data_source()[TFDS_SPLIT]
    except Exception as e:  # missing / unreadable TFDS metadata
        raise DatasetError(
            f"{path!r}: cannot open as a TFDS dataset ({type(e).__name__}: {e}); rerun the generation command"
        ) from e


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


class _Select:
    """grain map: a decoded TFDS example -> dict of the requested arrays."""

    def __init__(self, fields: Sequence[str]):
        self.fields = tuple(fields)

    def __call__(self, example: dict) -> dict:
        return {k: np.asarray(example[k]) for k in self.fields}


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
        ds = gp.MapDataset.source(_tfds_source(path, self.meta))
        if shuffle:
            ds = ds.shuffle(seed=self.seed)
        self._records = ds.repeat().map(_Select(self.fields))
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
        try:
            recs = [self._records[first + r] for r in range(*self.rows)]
        except Exception as e:  # a shard damaged after the dataset was opened
            raise DatasetError(
                f"{self.path!r}: cannot read batch {step} ({type(e).__name__}: {e}); a shard was changed after "
                f"the dataset was opened: rerun the generation command to rewrite damaged shards"
            ) from e
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
    meta = open_dataset(path)
    src = _tfds_source(path, meta)
    cols, texts = {}, []
    for i in range(len(src)):
        arrays, text = split_example(src[i], meta)
        for k, v in arrays.items():
            if fields is None or k in fields:
                cols.setdefault(k, []).append(v)
        texts.append(text)
    return {k: np.stack(v) for k, v in cols.items()}, texts


def write_records(
    writer: ShardWriter, make_example: Callable[[int], dict], progress: bool = False, desc: str = "writing"
) -> int:
    """Write this host's pending shards from ``make_example(sample_id) -> dict``; returns shards written."""
    from tqdm import tqdm

    todo = writer.pending()
    total = sum(writer.shards[j]["num_records"] for j in todo)
    with tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for j in todo:
            s = writer.shards[j]

            def gen(s=s):
                for i in range(s["first_id"], s["first_id"] + s["num_records"]):
                    yield make_example(i)
                    bar.update(1)

            writer.write_shard(j, gen())
    writer.finalize()
    return len(todo)
