"""umT5 text encoder: parity with transformers' UMT5EncoderModel (both checkpoint layouts), padding,
relative-position buckets, tokenizer parity, conversion errors, and the encode_prompts tool.

The fixture (tests/fixtures/umt5_tiny) is made by scripts/make_umt5_fixture.py with torch +
transformers; these tests need neither.
"""

import os
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from crm_jax.models import umt5_convert
from crm_jax.models.tokenizer import UMT5Tokenizer
from crm_jax.models.umt5 import UMT5_TINY, init_encoder, relative_position_buckets

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "umt5_tiny")
IO = np.load(os.path.join(FIX, "io.npz"))
TOK = np.load(os.path.join(FIX, "tokens.npz"))
TRANSFORMERS = os.path.join(FIX, "transformers")
WEIGHTS = "model.safetensors"


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model():
    return umt5_convert.load_umt5(TRANSFORMERS)


def test_parity_transformers_layout(model):
    assert model.cfg == UMT5_TINY.replace(text_len=512)
    y = model(jnp.asarray(IO["ids"]), jnp.asarray(IO["mask"]))
    assert y.dtype == jnp.float32 and y.shape == (3, 64, 32)
    assert rel(y, IO["out"]) < 1e-4


@pytest.mark.parametrize("path", ["original/umt5_tiny.pth", "original/umt5_tiny.safetensors", "original"])
def test_parity_original_wan_layout(path):
    m = umt5_convert.load_umt5(os.path.join(FIX, path))
    assert (m.cfg.num_layers, m.cfg.num_heads, m.cfg.d_kv, m.cfg.vocab_size) == (2, 4, 8, 128)
    assert rel(m(jnp.asarray(IO["ids"]), jnp.asarray(IO["mask"])), IO["out"]) < 1e-4


def test_bfloat16_compute_is_close():
    m = umt5_convert.load_umt5(TRANSFORMERS, dtype="bfloat16", param_dtype="bfloat16")
    y = m(jnp.asarray(IO["ids"]), jnp.asarray(IO["mask"]))
    assert y.dtype == jnp.float32
    assert rel(y, IO["out"]) < 3e-2


def test_padding_is_masked_and_zeroed(model):
    ids, mask = IO["ids"], IO["mask"]
    base = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    # what sits in padded slots does not change real tokens' outputs
    junk = np.where(mask == 1, ids, 77).astype(np.int32)
    again = np.asarray(model(jnp.asarray(junk), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(again[real], base[real], rtol=1e-5, atol=1e-5)
    # the prompt alone (no padding at all) gives the same embeddings
    n = int(mask[1].sum())
    alone = np.asarray(model(jnp.asarray(ids[1:2, :n]), jnp.asarray(mask[1:2, :n])))
    np.testing.assert_allclose(alone[0], base[1, :n], rtol=1e-5, atol=1e-5)
    # Wan's zero padding
    z = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), zero_padding=True))
    assert np.all(z[~real] == 0) and np.array_equal(z[real], base[real])
    with pytest.raises(ValueError, match="mask"):
        model(jnp.asarray(ids), jnp.asarray(mask[:, :10]))


def test_relative_position_buckets():
    b = relative_position_buckets(300, 300, 32, 128)
    d = lambda q, k: int(b[q, k])  # noqa: E731  (bucket of key k seen from query q)
    assert d(5, 5) == 0 and d(5, 4) == 1 and d(5, 6) == 17 and d(10, 3) == 7 and d(10, 2) == 8
    assert d(20, 8) == 9  # distance 12: 8 + int(8 log(12/8) / log(16))
    assert d(299, 0) == 15 and d(0, 299) == 31 and d(200, 73) == 15  # distance 127
    assert d(200, 136) == 14 and d(200, 137) == 13  # distances 64 (= 8 * 16^(6/8)) and 63
    assert b.min() == 0 and b.max() == 31 and b.dtype == np.int32


def test_tokenizer_matches_transformers():
    tok = UMT5Tokenizer(os.path.join(FIX, "tokenizer"))
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    prompts = [str(p) for p in TOK["prompts"]]
    for ml in (16, 64):
        ids, mask = tok.encode(prompts, max_len=ml)
        assert ids.dtype == np.int32 and ids.shape == (len(prompts), ml)
        np.testing.assert_array_equal(ids, TOK[f"ids_{ml}"])
        np.testing.assert_array_equal(mask, TOK[f"mask_{ml}"])
    ids, mask = tok.encode(prompts, max_len=16)
    assert np.all(ids[:, -1][mask[:, -1] == 1] == 1)  # truncated prompts still end with </s>


def test_tokenizer_against_the_library_and_errors(tmp_path):
    from tokenizers import Tokenizer

    lib = Tokenizer.from_file(os.path.join(FIX, "tokenizer", "tokenizer.json"))  # its post-processor adds </s>
    tok = UMT5Tokenizer(os.path.join(FIX, "tokenizer", "tokenizer.json"), clean=False)
    for text in ["a cat on the beach", "waves crashing, time-lapse!", ""]:
        want = lib.encode(text).ids
        ids, mask = tok.encode(text, max_len=40)
        assert list(ids[0, : len(want)]) == want and mask[0].sum() == len(want) and not ids[0, len(want) :].any()
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        UMT5Tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer file"):
        UMT5Tokenizer(str(tmp_path))


# ----------------------------------------------------------------- conversion errors
def _broken_copy(tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(TRANSFORMERS, dst)
    sd = load_file(str(dst / WEIGHTS))
    edit(sd)
    save_file(sd, str(dst / WEIGHTS))
    return str(dst)


def test_missing_key_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.pop("encoder.block.1.layer.1.DenseReluDense.wi_0.weight"))
    with pytest.raises(ValueError, match=r"missing \(1\).*encoder.block.1.<ffn.wi_0.kernel>"):
        umt5_convert.load_umt5(path)


def test_unexpected_key_is_named(tmp_path):
    def edit(sd):
        sd["encoder.block.0.layer.0.SelfAttention.extra.weight"] = np.ones(3, np.float32)
        sd["decoder.block.0.layer.0.layer_norm.weight"] = np.ones(3, np.float32)  # skipped: seq2seq decoder

    with pytest.raises(ValueError, match=r"unexpected \(1\).*SelfAttention.extra.weight"):
        umt5_convert.load_umt5(_broken_copy(tmp_path, edit))


def test_wrong_shape_is_named(tmp_path):
    path = _broken_copy(tmp_path, lambda sd: sd.update({"encoder.final_layer_norm.weight": np.ones(5, np.float32)}))
    with pytest.raises(ValueError, match=r"wrong shape.*norm/weight: checkpoint \(5,\) vs model \(32,\)"):
        umt5_convert.load_umt5(path)


def test_mismatched_config_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"(?s)does not match the encoder config.*encoder.block.2"):
        umt5_convert.load_umt5(TRANSFORMERS, cfg=UMT5_TINY.replace(num_layers=3))
    with pytest.raises(ValueError, match=r"unexpected \(10\)"):
        umt5_convert.load_umt5(TRANSFORMERS, cfg=UMT5_TINY.replace(num_layers=1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        umt5_convert.load_umt5(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors or torch"):
        umt5_convert.load_umt5(str(tmp_path / "empty"))


def test_original_layout_torch_file_matches_safetensors():
    from crm_jax.models.torch_checkpoint import load_torch_state_dict

    a = load_torch_state_dict(os.path.join(FIX, "original", "umt5_tiny.pth"))
    b = load_file(os.path.join(FIX, "original", "umt5_tiny.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    renamed = {umt5_convert.original_to_transformers_key(k) for k in a}
    assert renamed == set(load_file(os.path.join(TRANSFORMERS, WEIGHTS)))


def test_random_init_runs():
    m = init_encoder(UMT5_TINY.replace(num_layers=1))
    y = m(jnp.zeros((2, 5), jnp.int32))
    assert y.shape == (2, 5, 32) and bool(jnp.isfinite(y).all())


# ----------------------------------------------------------------- encode_prompts
def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# test prompts\n" + "\n".join(str(p) for p in TOK["prompts"]) + "\n", encoding="utf-8")
    return str(path)


def _run(tmp_path, out, *flags, **kw):
    from crm_jax.tools import encode_prompts

    args = dict(
        encoder=TRANSFORMERS,
        tokenizer=os.path.join(FIX, "tokenizer"),
        prompts=_prompt_file(tmp_path),
        negative_prompt=str(TOK["negative_prompt"]),
        out=str(out),
        max_len="64",
        batch_size="3",
        dtype="float32",
    )
    args.update(kw)
    return encode_prompts.main([f"--{k}={v}" for k, v in args.items()] + ["--no_progress", *flags])


def test_encode_prompts_end_to_end(tmp_path):
    out = tmp_path / "emb"
    assert _run(tmp_path, out) == 0
    z = np.load(out / "embeddings.npz", allow_pickle=False)
    n = len(TOK["prompts"])
    assert z["context"].shape == (n, 64, 32) and z["context"].dtype == np.float32
    assert list(z["prompts"]) == [str(p).strip() for p in TOK["prompts"]]
    np.testing.assert_array_equal(z["lengths"], TOK["lengths"])
    for r, ln in enumerate(z["lengths"]):
        assert not z["context"][r, ln:].any() and np.abs(z["context"][r, ln - 1]).sum() > 0
    assert rel(z["context"], TOK["context"]) < 1e-4  # Wan-style embeddings from transformers
    assert rel(z["negative_context"], TOK["negative_context"]) < 1e-4
    assert str(z["negative_prompt"]) == str(TOK["negative_prompt"])
    neg = np.load(out / "negative.npz", allow_pickle=False)
    np.testing.assert_array_equal(neg["prompt_embed"], z["negative_context"])

    # the synthetic-data generator reads it as it is
    from crm_jax.data.generate import EmbeddingConditioner
    from crm_jax.models.config import TINY

    c = ml_collections.ConfigDict(dict(cond=dict(kind="embeddings", embeddings=str(out / "embeddings.npz"))))
    cond = EmbeddingConditioner(c, TINY.replace(text_len=64, text_dim=32), latent_frames=3)
    arrays, texts = cond.get(np.array([1, n + 2]))
    np.testing.assert_array_equal(arrays["context"], z["context"][[1, 2]])
    assert texts[0] == z["prompts"][1] and cond.negative_context().shape == (64, 32)

    # refuses to overwrite; --overwrite replaces
    assert _run(tmp_path, out) == 2
    assert _run(tmp_path, out, "--overwrite") == 0


def test_encode_prompts_missing_inputs(tmp_path, capsys):
    out = tmp_path / "emb"
    assert _run(tmp_path, out, encoder=str(tmp_path / "no_encoder")) == 1
    assert "--encoder" in capsys.readouterr().err
    assert _run(tmp_path, out, tokenizer=str(tmp_path / "no_tok.json")) == 1
    assert _run(tmp_path, out, prompts=str(tmp_path / "no_prompts.txt")) == 1
    assert not out.exists()
    capsys.readouterr()
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    assert _run(tmp_path, a_file) == 2  # an output that is a file: refused before any encoding
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "is a file" in err[0]
    assert a_file.read_text() == "kept"


def test_xxl_shapes_abstractly():
    """The real umt5-xxl config traces at Wan's 512 tokens (no parameters allocated)."""
    import jax
    from flax import nnx

    from crm_jax.models.umt5 import UMT5_XXL, UMT5Encoder

    cfg = UMT5_XXL.replace(dtype="bfloat16", param_dtype="bfloat16")
    m = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert 5.6e9 < n_params < 5.8e9  # umt5-xxl encoder: ~5.68 B parameters
    graphdef, state = nnx.split(m)
    out = jax.eval_shape(
        lambda s, i, k: nnx.merge(graphdef, s)(i, k, zero_padding=True),
        state,
        jax.ShapeDtypeStruct((2, 512), jnp.int32),
        jax.ShapeDtypeStruct((2, 512), jnp.int32),
    )
    assert out.shape == (2, 512, 4096) and out.dtype == jnp.float32


def test_encode_prompts_reads_actions(tmp_path):
    from crm_jax.tools.encode_prompts import read_prompts

    f = tmp_path / "p.txt"
    f.write_text("a cat | 0 1 2\n# skip\nwaves | up down stay\n")
    texts, actions = read_prompts(str(f), num_actions=5)
    assert texts == ["a cat", "waves"] and actions.shape == (2, 3) and actions.dtype == np.int32
    f.write_text("a cat | 0 1 2\nwaves\n")
    with pytest.raises(ValueError, match=r"p.txt:2: no actions"):
        read_prompts(str(f), num_actions=5)
    f.write_text("a cat | 0 1 2\nwaves | 1\n")
    with pytest.raises(ValueError, match="different numbers of actions"):
        read_prompts(str(f), num_actions=5)
