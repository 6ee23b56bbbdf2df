"""Read PyTorch checkpoints (`torch.save`'s zip format) into numpy, without torch.

`torch.save` (default since torch 1.6) writes a zip archive::

    <name>/data.pkl        pickle of the saved object; tensors are
                           `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
                           whose storages are persistent ids
                           `("storage", torch.<Dtype>Storage, key, location, numel)`
    <name>/data/<key>      raw little-endian bytes of storage `key`
    <name>/byteorder       "little" (absent in old files: little)

The pickle is read with a restricted `pickle.Unpickler` that only resolves the few
globals above (tensor rebuilders, storage classes, `collections.OrderedDict`); any
other global is refused, so loading never runs code from the file. Storages stored
uncompressed (torch's default) are memory-mapped: contiguous tensors come back as
read-only views of the file, strided/offset views as contiguous copies.

bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays (or float32 with
`bf16_as_float32=True`).
"""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

# torch storage class name -> numpy dtype
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# wrapper keys of training checkpoints, tried in this order
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema", "model_ema")


class _StorageType:
    """Stand-in for a `torch.<Dtype>Storage` class: just its dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    """One storage: a flat numpy array of `numel` elements."""

    def __init__(self, data: np.ndarray, key: str):
        self.data, self.key = data, key


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """numpy equivalent of `torch._utils._rebuild_tensor_v2`."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor storage is {type(storage).__name__}, not a checkpoint storage")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"bad tensor geometry: offset {offset}, size {size}, stride {stride}")
    flat = storage.data
    if 0 in size:
        return np.zeros(size, flat.dtype)
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent > flat.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size}, stride {stride}, offset {offset} needs {extent} elements but storage "
            f"{storage.key!r} holds {flat.size}"
        )
    contiguous = tuple(int(np.prod(size[i + 1 :])) for i in range(len(size)))
    if stride == contiguous or len(size) == 0:
        return flat[offset : offset + int(np.prod(size))].reshape(size)
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[offset:extent], size, tuple(s * item for s in stride), writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    """numpy equivalent of `torch._utils._rebuild_parameter` (a Parameter is its tensor)."""
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage", "torch.cuda") and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': only tensors, storages and OrderedDicts are "
            f"allowed in a checkpoint read without torch"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {stype!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(self._load_storage(key, stype.dtype, int(numel)), key)
        st = self._storages[key]
        if st.data.dtype != stype.dtype:  # same bytes viewed as another dtype
            return _Storage(st.data.view(np.uint8).view(stype.dtype), key)
        return st


def _stored_offset(f, info: zipfile.ZipInfo) -> int:
    """Byte offset of an uncompressed member's data in the archive file."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise ValueError(f"bad local header for zip member {info.filename!r}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def load_torch_state_dict(path: str, *, bf16_as_float32: bool = False, unwrap: bool = True) -> dict[str, np.ndarray]:
    """Tensors of a `torch.save` zip checkpoint as `{name: np.ndarray}`.

    Args:
      path: the `.pth` / `.pt` / `.bin` file.
      bf16_as_float32: convert bfloat16 tensors to float32 (default: `ml_dtypes.bfloat16`).
      unwrap: unwrap `{"state_dict": {...}}`-style training checkpoints (keys in
        `WRAPPER_KEYS`) and flatten nested dicts of tensors with dotted names;
        non-tensor entries (epoch counters, configs) are dropped. With `unwrap=False`
        the top-level object must itself be a flat dict of tensors.
    Raises:
      FileNotFoundError: no such file.
      ValueError: a legacy (pre-1.6, non-zip) or corrupt file, a pickle that refers to
        anything but tensors/storages/OrderedDicts, or no tensors found.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(2)
        kind = "a legacy (torch < 1.6) pickle checkpoint" if head[:1] == b"\x80" else "not a zip archive"
        raise ValueError(
            f"{path!r} is {kind}: only torch.save's zip format is supported; re-save it "
            f"with torch.save(obj, path) under torch >= 1.6, or as safetensors"
        )
    try:
        obj = _read_zip(path)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, KeyError, ValueError, OSError) as e:
        raise ValueError(f"cannot read torch checkpoint {path!r}: {e}") from e
    sd = _collect(obj, unwrap)
    if not sd:
        raise ValueError(
            f"torch checkpoint {path!r} holds no tensors (top level: {type(obj).__name__}"
            + (f" with keys {list(obj)[:10]}" if isinstance(obj, dict) else "")
            + ")"
        )
    if bf16_as_float32:
        sd = {k: (v.astype(np.float32) if v.dtype == ml_dtypes.bfloat16 else v) for k, v in sd.items()}
    return sd


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        pkls = [n for n in infos if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(pkls) != 1:
            raise ValueError(f"expected one '<name>/data.pkl' in the archive, found {pkls or 'none'}")
        prefix = pkls[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        if order is not None and zf.read(order).decode().strip() != "little":
            raise ValueError("big-endian checkpoints are not supported")

        with open(path, "rb") as raw:
            try:
                mm = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                mm = None

            def load_storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
                name = f"{prefix}data/{key}"
                info = infos.get(name)
                if info is None:
                    raise ValueError(f"storage {name!r} is missing from the archive")
                nbytes = numel * dtype.itemsize
                if info.file_size < nbytes:
                    raise ValueError(
                        f"storage {name!r} has {info.file_size} bytes, expected {nbytes} ({numel} x {dtype.name})"
                    )
                if info.compress_type == zipfile.ZIP_STORED and mm is not None:
                    start = _stored_offset(raw, info)
                    if start + nbytes > len(mm):
                        raise ValueError(f"storage {name!r} runs past the end of the file (truncated?)")
                    return np.frombuffer(mm, dtype, numel, start)
                return np.frombuffer(zf.read(info), dtype, numel)

            with zf.open(pkls[0]) as f:
                return _RestrictedUnpickler(f, load_storage).load()


def _collect(obj, unwrap: bool) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        return {}
    if not unwrap:
        return {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not any(isinstance(v, np.ndarray) for v in obj.values()):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                inner = _collect(obj[key], True)
                if inner:
                    return inner
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
        elif isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in _collect(v, True).items()})
    return out
