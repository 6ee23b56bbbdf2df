"""Checkpoint conversion: parity with diffusers' PyTorch Wan2.1, both layouts, round trips, errors.

The fixture (tests/fixtures/wan_tiny) is made by scripts/make_wan_fixture.py with
torch + diffusers; these tests need neither.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crm_jax.assets import TOY_TEACHER
from crm_jax.models import convert
from crm_jax.models.wan import functional

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "wan_tiny")
IO = np.load(os.path.join(FIX, "io.npz"))


def forward(model):
    apply, params = functional(model)
    x = jnp.asarray(IO["x"]).transpose(0, 2, 3, 4, 1)  # [B, C, T, H, W] -> [B, T, H, W, C]
    y = jax.jit(apply)(params, x, jnp.asarray(IO["t"]), jnp.asarray(IO["context"]))
    return np.asarray(y).transpose(0, 4, 1, 2, 3)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_parity_with_diffusers(layout):
    model = convert.load_wan(os.path.join(FIX, layout), text_len=8)
    assert model.cfg.num_layers == 2 and model.cfg.num_heads == 4
    assert rel(forward(model), IO["out"]) < 1e-4


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_save_round_trip_is_exact(layout, tmp_path):
    model = convert.load_wan(os.path.join(FIX, "diffusers"), text_len=8)
    convert.save_wan(model, str(tmp_path), layout=layout)
    saved = load_file(str(tmp_path / convert.WEIGHTS))
    src = load_file(os.path.join(FIX, layout, convert.WEIGHTS))
    assert set(saved) == set(src)
    for k in src:
        np.testing.assert_array_equal(saved[k], src[k], err_msg=k)
    again = convert.load_wan(str(tmp_path), text_len=8)
    np.testing.assert_array_equal(forward(again), forward(model))


def test_key_renaming_is_a_bijection():
    keys = load_file(os.path.join(FIX, "diffusers", convert.WEIGHTS)).keys()
    for k in keys:
        assert convert.original_to_diffusers_key(convert.diffusers_to_original_key(k)) == k


def _broken_copy(tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIX, "diffusers"), dst)
    sd = load_file(str(dst / convert.WEIGHTS))
    edit(sd)
    save_file(sd, str(dst / convert.WEIGHTS))
    return str(dst)


def test_missing_key_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.pop("blocks.1.attn2.to_k.weight"))
    with pytest.raises(ValueError, match=r"missing \(1\).*blocks.1.<attn2.to_k.kernel>"):
        convert.load_wan(path, text_len=8)


def test_unexpected_key_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.update({"blocks.0.attn1.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected \(1\).*blocks.0.attn1.extra.weight"):
        convert.load_wan(path, text_len=8)


def test_wrong_shape_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.update({"proj_out.bias": np.ones(5, np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shape.*proj_out/bias: checkpoint \(5,\) vs model \(16,\)"):
        convert.load_wan(path, text_len=8)


def test_mismatched_config_is_an_error():
    from crm_jax.models.config import TINY

    with pytest.raises(ValueError, match="does not match the model config"):
        convert.load_wan(os.path.join(FIX, "diffusers"), cfg=TINY.replace(num_layers=3))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.load_wan(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        convert.load_wan(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(FIX, "diffusers"), bad)
    with open(bad / convert.WEIGHTS, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        convert.load_wan(str(bad), text_len=8)
    os.remove(bad / convert.WEIGHTS)
    shutil.copy(os.path.join(FIX, "diffusers", convert.WEIGHTS), bad / convert.WEIGHTS)
    os.remove(bad / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_wan(str(bad), text_len=8)


def test_cli_round_trip_through_nnx(tmp_path):
    from crm_jax.tools import convert_wan

    nnx_dir, orig_dir = tmp_path / "nnx", tmp_path / "orig"
    assert convert_wan.main(["--src", os.path.join(FIX, "diffusers"), "--dst", str(nnx_dir), "--text_len", "8"]) == 0
    assert convert_wan.main(["--src", str(nnx_dir), "--dst", str(orig_dir), "--to", "original"]) == 0
    assert rel(forward(convert.load_wan(str(orig_dir))), IO["out"]) < 1e-4
    # refuses to overwrite, and reports a bad source without writing anything
    assert convert_wan.main(["--src", str(nnx_dir), "--dst", str(orig_dir)]) == 2
    assert convert_wan.main(["--src", str(tmp_path / "none"), "--dst", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_cli_keeps_actions_text_len_and_mean_flow(layout, tmp_path):
    """The shipped toy teacher (5 actions, 4 text tokens) survives nnx -> layout -> nnx exactly, and so
    does a MeanFlow model's interval embedding: nothing this project adds to Wan2.1 is dropped."""
    from flax import nnx

    from crm_jax.models.wan import WanModel
    from crm_jax.tools.convert_wan import main

    teacher = TOY_TEACHER
    mean_flow = tmp_path / "mf"
    convert.save_nnx(WanModel(convert.load_nnx(teacher).cfg.replace(mean_flow=True), rngs=nnx.Rngs(1)), mean_flow)
    for src in (teacher, str(mean_flow)):
        name = os.path.basename(src)
        out, back = tmp_path / f"{name}_{layout}", tmp_path / f"{name}_back"
        assert main(["--src", src, "--dst", str(out), "--to", layout]) == 0
        assert main(["--src", str(out), "--dst", str(back), "--to", "nnx"]) == 0
        a, b = convert.load_nnx(src), convert.load_nnx(str(back))
        assert b.cfg == a.cfg and b.cfg.num_actions == 5 and b.cfg.text_len == 4
        flat_b = dict(nnx.to_flat_state(nnx.state(b, nnx.Param)))
        for path, v in nnx.to_flat_state(nnx.state(a, nnx.Param)):
            assert np.array_equal(np.asarray(v[...]), np.asarray(flat_b[path][...])), path


def test_interrupted_export_keeps_the_previous_one(tmp_path, monkeypatch):
    """A failure (or kill) while an export is written leaves the previous export whole and loadable."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from crm_jax.models.config import TINY
    from crm_jax.models.wan import WanModel

    path = str(tmp_path / "export")
    old, new = WanModel(TINY, rngs=nnx.Rngs(0)), WanModel(TINY, rngs=nnx.Rngs(1))
    convert.save_nnx(old, path)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        convert.save_nnx(new, path)
    monkeypatch.undo()
    got = dict(nnx.to_flat_state(nnx.state(convert.load_nnx(path), nnx.Param)))
    for p, v in nnx.to_flat_state(nnx.state(old, nnx.Param)):
        assert np.array_equal(np.asarray(v[...]), np.asarray(got[p][...])), p
    os.replace(path, path + ".previous")  # killed between the two renames: the old one is still found
    assert convert.load_any(path).cfg == old.cfg
    convert.save_nnx(new, path)
    assert not os.path.exists(path + ".previous") and not os.path.exists(path + ".partial")


def test_nnx_checkpoint_holds_the_architecture_and_loads_older_configs(tmp_path):
    """wan_config.json holds the architecture only; the loader's overrides set the runtime, and runtime
    fields in older files (flat, as in the shipped toy teacher) still load."""
    import json

    from crm_jax.models.config import RUNTIME_FIELDS, TINY, WanConfig, model_config_from, same_architecture
    from crm_jax.models.wan import init_model

    cfg = TINY.replace(num_actions=3, dtype="bfloat16", attn_impl="xla", remat="block")
    assert cfg.runtime.dtype == "bfloat16" and cfg.runtime.remat == "block" and cfg.num_actions == 3
    convert.save_nnx(init_model(cfg), str(tmp_path / "m"))
    with open(tmp_path / "m" / convert.NNX_CONFIG) as f:
        saved = json.load(f)
    assert saved == cfg.architecture() and not set(saved) & {"runtime", *RUNTIME_FIELDS}
    loaded = convert.load_nnx(str(tmp_path / "m"), attn_impl="xla").cfg
    assert same_architecture(loaded, cfg) and loaded.runtime.attn_impl == "xla" and loaded.runtime.dtype == "float32"
    old = {**saved, "dtype": "bfloat16", "remat": "dots", "attn_tiles": [16, 16]}
    assert WanConfig.from_dict(old) == cfg.replace(remat="dots", attn_impl="auto", attn_tiles=(16, 16))
    toy = os.path.join(TOY_TEACHER, convert.NNX_CONFIG)
    with open(toy) as f:
        WanConfig.from_dict(json.load(f))
    import ml_collections

    block = ml_collections.ConfigDict(
        dict(name="tiny", overrides=dict(num_layers=3, attn_tiles=[16, 32], remat="block"))
    )
    mcfg = model_config_from(block)
    assert mcfg.num_layers == 3 and mcfg.runtime.attn_tiles == (16, 32) and mcfg.runtime.remat == "block"
