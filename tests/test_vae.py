"""Wan2.1 VAE: parity with diffusers' AutoencoderKLWan, streaming decode, conversion, errors.

The fixture (tests/fixtures/wan_vae_tiny) is made by scripts/make_vae_fixture.py with
torch + diffusers; these tests need neither. Tensors in io.npz are `[B, C, T, H, W]`.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from crm_jax.models import vae as V
from crm_jax.models import vae_convert as C

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "wan_vae_tiny")
DIFFUSERS = os.path.join(FIX, "diffusers")
ORIGINAL = os.path.join(FIX, "original", "Wan2.1_VAE.safetensors")
IO = np.load(os.path.join(FIX, "io.npz"))


def cl(a):  # [B, C, T, H, W] -> [B, T, H, W, C]
    return jnp.asarray(a).transpose(0, 2, 3, 4, 1)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@functools.cache
def model(dtype="float32"):
    return C.load_wan_vae(DIFFUSERS, dtype=dtype)


@functools.cache
def jitted(dtype="float32"):
    graphdef, params = nnx.split(model(dtype))
    decode = jax.jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    moments = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_moments(x))
    return params, decode, moments


def latents(frames=3):
    """The first `frames` of the fixture's latents `[1, 3, 3, 4, 4]` (channels last)."""
    return cl(IO["z"])[:, :frames]


# ----------------------------------------------------------------- parity
def test_config_is_read_and_matches_tiny_preset():
    assert model().cfg == V.TINY_VAE


def test_decode_parity_with_diffusers():
    params, decode, _ = jitted()
    y = decode(params, cl(IO["z"]))
    assert y.shape == (1, 9, 24, 32, 3)
    assert rel(np.asarray(y).transpose(0, 4, 1, 2, 3), IO["decoded"]) < 1e-4


def test_encode_parity_with_diffusers():
    params, _, moments = jitted()
    mean, logvar = moments(params, cl(IO["video"]))
    assert mean.shape == (1, 3, 2, 3, 4)
    assert rel(np.asarray(mean).transpose(0, 4, 1, 2, 3), IO["mean"]) < 1e-4
    assert rel(np.asarray(logvar).transpose(0, 4, 1, 2, 3), IO["logvar"]) < 1e-4


def test_original_layout_gives_the_same_parameters():
    a = nnx.to_flat_state(nnx.state(model(), nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(C.load_wan_vae(ORIGINAL, cfg=V.TINY_VAE), nnx.Param)))
    assert len(a) == len(b)
    for path, v in a:
        np.testing.assert_array_equal(np.asarray(b[path][...]), np.asarray(v[...]), err_msg=str(path))


def test_original_pth_loads_when_reader_is_available():
    pytest.importorskip("crm_jax.models.torch_checkpoint")
    m = C.load_wan_vae(os.path.join(FIX, "original", "Wan2.1_VAE.pth"), cfg=V.TINY_VAE)
    sd = C.params_to_state_dict(m)
    src = load_file(os.path.join(DIFFUSERS, C.WEIGHTS))
    for k in src:
        np.testing.assert_array_equal(sd[k], src[k], err_msg=k)


def test_pth_goes_through_the_torch_checkpoint_reader(monkeypatch, tmp_path):
    """The .pth branch imports `crm_jax.models.torch_checkpoint` lazily (a stand-in reader here)."""
    import sys
    import types

    seen = []
    fake = types.ModuleType("crm_jax.models.torch_checkpoint")
    fake.load_torch_state_dict = lambda path: seen.append(path) or {"state_dict": load_file(ORIGINAL)}
    monkeypatch.setitem(sys.modules, "crm_jax.models.torch_checkpoint", fake)
    fn = tmp_path / "Wan2.1_VAE.pth"
    fn.write_bytes(b"")
    m = C.load_wan_vae(str(fn), cfg=V.TINY_VAE)
    assert seen == [str(fn)]
    np.testing.assert_array_equal(
        np.asarray(m.decoder.conv_in.kernel[...]), np.asarray(model().decoder.conv_in.kernel[...])
    )


def test_bfloat16_decode_is_close():
    params, decode, _ = jitted("bfloat16")
    y = decode(params, cl(IO["z"]))
    assert y.dtype == jnp.float32
    assert rel(np.asarray(y).transpose(0, 4, 1, 2, 3), IO["decoded"]) < 3e-2


def test_real_config_has_diffusers_parameter_count():
    abstract = nnx.state(nnx.eval_shape(lambda: V.WanVAE(V.WAN_VAE, rngs=nnx.Rngs(0))), nnx.Param)
    leaves = jax.tree.leaves(abstract)
    assert len(leaves) == 194  # tensors in AutoencoderKLWan's state dict
    assert sum(int(np.prod(x.shape)) for x in leaves) == 126_892_531


# ----------------------------------------------------------------- streaming
@pytest.mark.parametrize("chunks,normalized", [((1, 1, 1), False), ((2, 1), True)])
def test_streaming_decode_equals_whole_decode(chunks, normalized):
    """Frame by frame, and 2 + 1 latent frames fed as the DiT's normalized latents."""
    params, decode, _ = jitted()
    z = cl(IO["z"])
    whole = decode(params, z)
    dec = _streamer(normalized)
    state = dec.init(1, 3, 4)
    outs, s = [], 0
    for n in chunks:
        zc = z[:, s : s + n]
        y, state = dec.step(state, model().normalize(zc) if normalized else zc)
        assert y.shape[1] == (1 + 4 * (n - 1) if s == 0 else 4 * n)
        outs.append(y)
        s += n
    np.testing.assert_allclose(np.concatenate(outs, axis=1), whole, atol=1e-5, rtol=0)


@functools.cache
def _streamer(normalized=False):
    return V.StreamingDecoder(model(), normalized=normalized)


def test_stream_state_is_a_fixed_shape_pytree():
    dec = _streamer()
    state = dec.init(1, 3, 4)
    assert state.first
    _, after = dec.step(state, latents(1))
    assert not after.first
    assert jax.tree.structure(after) != jax.tree.structure(state)  # `first` is static
    assert [c.shape for c in after.caches] == [c.shape for c in state.caches]
    assert all(c.shape[1] in (1, 2) for c in state.caches)


def test_normalize_round_trip():
    m = model()
    z = latents(3)
    zn = m.normalize(z)
    np.testing.assert_allclose(m.denormalize(zn), z, atol=1e-6)
    np.testing.assert_allclose(zn[..., 1], (z[..., 1] + 0.2) / 0.5, atol=1e-6)


def test_chunked_encode_equals_whole_encode():
    """diffusers' schedule: first frame, then 4 frames at a time, through the encoder caches."""
    graphdef, params = nnx.split(model())
    first = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_chunk(x))
    later = jax.jit(lambda p, x, c: nnx.merge(graphdef, p).encode_chunk(x, c, first=False))
    x = cl(IO["video"])
    m0, cache = first(params, x[:, :1])
    m1, cache = later(params, x[:, 1:5], cache)
    m2, _ = later(params, x[:, 5:9], cache)
    whole = jitted()[2](params, x)[0]
    np.testing.assert_allclose(jnp.concatenate([m0, m1, m2], axis=1)[..., :4], whole, atol=1e-5, rtol=0)


# ----------------------------------------------------------------- input errors
def test_bad_inputs_are_named():
    m = model()
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\].*\(1, 5, 16, 16, 4\)"):
        m.encode(jnp.zeros((1, 5, 16, 16, 4)))
    with pytest.raises(ValueError, match="T = 1 \\+ 4k frames, got T=4"):
        m.encode(jnp.zeros((1, 4, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        m.encode(jnp.zeros((1, 5, 12, 16, 3)))
    with pytest.raises(ValueError, match=r"\[B, T', h, w, 4\].*\(1, 2, 3, 4, 16\)"):
        m.decode(jnp.zeros((1, 2, 3, 4, 16)))
    dec = _streamer()
    with pytest.raises(ValueError, match="does not match the stream state"):
        dec.step(dec.init(1, 3, 4), jnp.zeros((1, 1, 4, 4, 4)))


def test_bad_configs():
    with pytest.raises(ValueError, match="temperal_downsample needs"):
        V.WanVAEConfig(temperal_downsample=(True,))
    with pytest.raises(ValueError, match="attn_scales"):
        V.WanVAEConfig(attn_scales=(1.0,))
    with pytest.raises(ValueError, match="is_residual=True"):
        C.config_from_diffusers(dict(is_residual=True))


# ----------------------------------------------------------------- conversion
def _broken_copy(tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(DIFFUSERS, dst)
    sd = load_file(str(dst / C.WEIGHTS))
    edit(sd)
    save_file(sd, str(dst / C.WEIGHTS))
    return str(dst)


def test_missing_key_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.pop("decoder.up_blocks.1.upsamplers.0.time_conv.weight"))
    with pytest.raises(ValueError, match=r"missing \(1\).*decoder.up_blocks.1.upsamplers.0.time_conv.weight"):
        C.load_wan_vae(path)


def test_unexpected_key_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.update({"encoder.extra.weight": np.ones(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected \(1\).*encoder.extra.weight"):
        C.load_wan_vae(path)


def test_wrong_shape_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.update({"quant_conv.bias": np.ones(5, np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shape.*quant_conv.bias: checkpoint \(5,\) vs model \(8,\)"):
        C.load_wan_vae(path)


def test_original_layout_errors_use_original_names(tmp_path):
    sd = load_file(ORIGINAL)
    sd.pop("decoder.upsamples.3.shortcut.weight")
    fn = str(tmp_path / "vae.safetensors")
    save_file(sd, fn)
    with pytest.raises(ValueError, match=r"(?s)original layout.*missing \(1\).*upsamples.3.shortcut.weight"):
        C.load_wan_vae(fn, cfg=V.TINY_VAE)
    with pytest.raises(ValueError, match="does not match the model config"):
        C.load_wan_vae(ORIGINAL)  # defaults to the full-size WAN_VAE config


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.load_wan_vae(str(tmp_path / "nope.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=C.WEIGHTS):
        C.load_wan_vae(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    shutil.copytree(DIFFUSERS, bad)
    os.remove(bad / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        C.load_wan_vae(str(bad))
    with open(bad / C.WEIGHTS, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="cannot read safetensors file"):
        C.load_wan_vae(str(bad), cfg=V.TINY_VAE)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="don't know how to read"):
        C.load_wan_vae(str(tmp_path / "weights.npz"))


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_save_round_trip_is_exact(layout, tmp_path):
    if layout == "diffusers":
        dst, src = str(tmp_path / "vae"), os.path.join(DIFFUSERS, C.WEIGHTS)
        C.save_wan_vae(model(), dst)
        saved = load_file(os.path.join(dst, C.WEIGHTS))
    else:
        dst, src = str(tmp_path / "vae.safetensors"), ORIGINAL
        C.save_wan_vae(model(), dst, layout="original")
        saved = load_file(dst)
    ref = load_file(src)
    assert set(saved) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(saved[k], ref[k], err_msg=k)
    again = C.load_wan_vae(dst, cfg=None if layout == "diffusers" else V.TINY_VAE)
    assert again.cfg == V.TINY_VAE
