"""Torch-free reader of `torch.save` zip checkpoints against arrays saved by torch itself.

Fixtures: tests/fixtures/umt5_tiny/torch_ckpt (scripts/make_umt5_fixture.py).
"""

import os
import zipfile

import ml_dtypes
import numpy as np
import pytest

from crm_jax.models.torch_checkpoint import load_torch_state_dict

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "umt5_tiny", "torch_ckpt")
EXP = np.load(os.path.join(FIX, "expected.npz"))


def test_flat_checkpoint_all_dtypes_and_views():
    sd = load_torch_state_dict(os.path.join(FIX, "flat.pth"))
    want = {k.split("/", 1)[1]: EXP[k] for k in EXP.files if k.startswith("flat/")}
    assert set(sd) == set(want)
    dtypes = {
        "f32": np.float32,
        "bf16": ml_dtypes.bfloat16,
        "fp16": np.float16,
        "i64": np.int64,
        "bool": np.bool_,
        "transposed": np.float32,
        "offset_slice": np.float32,
        "bf16_view": ml_dtypes.bfloat16,
        "param": np.float32,
    }
    for k, dt in dtypes.items():
        assert sd[k].dtype == np.dtype(dt), k
    for k, v in want.items():
        assert sd[k].shape == v.shape, k
        np.testing.assert_array_equal(np.asarray(sd[k], v.dtype), v, err_msg=k)
    assert sd["scalar"].shape == () and float(sd["scalar"]) == 2.5
    assert sd["transposed"].flags.c_contiguous and sd["strided"].shape == (2, 2)


def test_bf16_as_float32():
    sd = load_torch_state_dict(os.path.join(FIX, "flat.pth"), bf16_as_float32=True)
    assert sd["bf16"].dtype == np.float32
    np.testing.assert_array_equal(sd["bf16"], EXP["flat/bf16"])


def test_wrapped_checkpoint_is_unwrapped_and_flattened():
    sd = load_torch_state_dict(os.path.join(FIX, "wrapped.pth"))
    assert set(sd) == {"encoder.w", "encoder.b", "head.w"}  # epoch / optimizer_name dropped
    for k in sd:
        np.testing.assert_array_equal(np.asarray(sd[k], np.float32), EXP[f"wrapped/{k}"].astype(np.float32))
    with pytest.raises(ValueError, match="holds no tensors"):
        load_torch_state_dict(os.path.join(FIX, "wrapped.pth"), unwrap=False)


def test_module_state_dict_with_metadata():
    sd = load_torch_state_dict(os.path.join(FIX, "module.pth"))
    assert set(sd) == {"weight", "bias"} and sd["weight"].dtype == ml_dtypes.bfloat16
    for k in sd:
        np.testing.assert_array_equal(np.asarray(sd[k], np.float32), EXP[f"module/{k}"])


def test_legacy_and_missing_files():
    with pytest.raises(ValueError, match="legacy"):
        load_torch_state_dict(os.path.join(FIX, "legacy.pth"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_torch_state_dict(os.path.join(FIX, "nope.pth"))


def _zip_with(tmp_path, pkl: bytes, files=None):
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x/data.pkl", pkl)
        for k, v in (files or {}).items():
            zf.writestr(k, v)
    return str(path)


def test_unknown_globals_are_refused(tmp_path):
    # GLOBAL os.system, then call it: must never be resolved
    evil = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    with pytest.raises(ValueError, match="refusing to load global 'os.system'"):
        load_torch_state_dict(_zip_with(tmp_path, evil))


def test_corrupt_files(tmp_path):
    # truncated archive
    bad = tmp_path / "trunc.pth"
    data = open(os.path.join(FIX, "flat.pth"), "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        load_torch_state_dict(str(bad))
    # a [3, 4] float tensor over storage '0' of 8 elements (handcrafted pickle, as torch writes it)
    pkl = (
        b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02"
        b"((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05"
        b"X\x03\x00\x00\x00cpuq\x06K\x08tq\x07QK\x00K\x03K\x04\x86K\x04K\x01\x86\x89ccollections\n"
        b"OrderedDict\n)Rtq\x08Rq\x09s."
    )
    short = _zip_with(tmp_path, pkl, {"x/data/0": np.zeros(8, np.float32).tobytes()})
    with pytest.raises(ValueError, match="needs 12 elements but storage '0' holds 8"):
        load_torch_state_dict(short)
    missing = _zip_with(tmp_path, pkl)
    with pytest.raises(ValueError, match="storage 'x/data/0' is missing"):
        load_torch_state_dict(missing)
