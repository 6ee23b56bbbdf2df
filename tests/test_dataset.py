"""Synthetic-data pipeline: teacher generation -> ArrayRecord dataset -> grain reader; converter; prompts."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from crm_jax.data import dataset as ds
from crm_jax.data import external
from crm_jax.data import generate as G
from crm_jax.data import prompts as pr
from crm_jax.data import toy_world as tw
from crm_jax.models.config import TINY

# A tiny teacher (TINY with 5 actions, made smaller still: compile time dominates on CPU).
SMALL = dict(
    in_channels=4,
    out_channels=4,
    text_len=8,
    text_dim=32,
    num_actions=5,
    dim=32,
    ffn_dim=64,
    num_heads=2,
    num_layers=1,
    freq_dim=16,
)
N, PER_SHARD = 10, 4  # 3 shards: 4 + 4 + 2


def gen_config(**kw):
    from configs.toy_generate import get_config

    c = get_config()
    c.model.overrides = SMALL
    c.allow_random_teacher = True
    c.num_samples, c.samples_per_shard, c.batch_size = N, PER_SHARD, 2
    c.latent_shape = (2, 4, 4, 4)
    c.sampler.num_steps = 3
    c.ode.save = True
    for k, v in kw.items():
        node, *rest = k.split(".")
        if rest:
            setattr(c[node], rest[0], v)
        else:
            setattr(c, k, v)
    return c


DEVICES = jax.local_devices()[:2]  # data parallel over 2 (of conftest's 8 CPU devices)


def run_gen(c, out, **kw):
    return G.generate(c, str(out), progress=False, devices=DEVICES, **kw)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference dataset, generated in one uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "ds"
    res = run_gen(gen_config(), out)
    assert res == {"written": 3, "pending": 0, "complete": True}
    return str(out)


def mcfg():
    return TINY.replace(**SMALL)


# ----------------------------------------------------------------------------- round trip


def test_tfds_codec_bit_exact():
    import ml_dtypes

    rng = np.random.default_rng(0)
    arrays = {
        "id": np.asarray(7, np.int64),
        "x": rng.normal(size=(2, 3, 5)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "a": np.arange(3, dtype=np.int32),
    }
    meta = ds.make_metadata(
        num_samples=1,
        samples_per_shard=1,
        features={k: ds.Feature(v.shape, ds.dtype_name(v.dtype)) for k, v in arrays.items()},
        text_fields=["prompt"],
    )
    feats = ds.tfds_features(meta)
    encoded = ds.example_encoder(meta)({**arrays, "prompt": "héllo | x"})
    example = feats.deserialize_example_np(encoded)
    got, text = ds.split_example(example, meta)
    assert text == {"prompt": "héllo | x"}
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].tobytes() == v.tobytes()


def test_tfds_reads_generated_set_without_tensorflow(ref):
    """`tfds.builder_from_directory(path).as_data_source()` reads the generated set, equal to what was written."""
    import sys

    import tensorflow_datasets as tfds

    cols, texts = ds.read_all(ref)
    train = tfds.builder_from_directory(ref).as_data_source()["train"]
    assert len(train) == N
    for i in range(N):
        ex = train[i]
        assert int(ex["id"]) == i and ex["prompt"].decode() == texts[i]["prompt"]
        for k in ("latents", "context", "actions", "ode_traj"):
            assert np.asarray(ex[k]).tobytes() == cols[k][i].tobytes(), k
    assert "tensorflow" not in sys.modules


def test_damaged_shard_named_on_open_and_rewritten_by_generate(ref, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    shard = out / ds.shard_name(1, 3)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(ds.DatasetError, match=rf"{ds.shard_name(1, 3)}.*damaged.*rerun the generation"):
        ds.open_dataset(str(out))
    shard0 = (out / ds.shard_name(0, 3)).read_bytes()
    assert run_gen(gen_config(), out) == {"written": 1, "pending": 0, "complete": True}
    assert (out / ds.shard_name(0, 3)).read_bytes() == shard0  # intact shards are kept
    assert shard.read_bytes() == open(os.path.join(ref, ds.shard_name(1, 3)), "rb").read()
    ds.open_dataset(str(out))


def _write_v1_dataset(path, n=3):
    """A dataset in the earlier CRMR record format (metadata version 1)."""
    import struct

    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(path)
    rng = np.random.default_rng(1)
    samples = []
    w = ArrayRecordWriter(os.path.join(path, "data-00000-of-00001.array_record"), "group_size:1")
    for i in range(n):
        arrays = {"id": np.asarray(i, np.int64), "latents": rng.normal(size=(2, 4, 4, 4)).astype(np.float32)}
        header, blobs, off = {"a": {}, "t": {"prompt": f"p{i}"}}, [], 0
        for k, a in arrays.items():
            header["a"][k] = [a.dtype.name, list(a.shape), off, a.nbytes]
            blobs.append(a.tobytes())
            off += a.nbytes
        h = json.dumps(header).encode()
        w.write(b"".join([b"CRMR", struct.pack("<I", len(h)), h, *blobs]))
        samples.append(arrays)
    w.close()
    meta = {
        "format": ds.FORMAT,
        "version": 1,
        "num_samples": n,
        "samples_per_shard": n,
        "features": {"id": {"shape": [], "dtype": "int64"}, "latents": {"shape": [2, 4, 4, 4], "dtype": "float32"}},
        "text_fields": ["prompt"],
        "shards": [{"file": "data-00000-of-00001.array_record", "first_id": 0, "num_records": n}],
        "source": {"kind": "test"},
        "num_actions": 0,
        "complete": True,
    }
    with open(os.path.join(path, ds.METADATA), "w") as f:
        json.dump(meta, f)
    return samples


def test_old_format_refused_with_the_upgrade_command_which_converts_it(tmp_path):
    from crm_jax.data import upgrade

    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    samples = _write_v1_dataset(old)
    with pytest.raises(ds.DatasetError, match=rf"old crm_jax record format.*python -m crm_jax.data.upgrade {old}"):
        ds.open_dataset(old)
    assert upgrade.main([old, new]) == 0
    cols, texts = ds.read_all(new)
    assert [t["prompt"] for t in texts] == ["p0", "p1", "p2"]
    for i, a in enumerate(samples):
        assert cols["latents"][i].tobytes() == a["latents"].tobytes()
    assert ds.read_metadata(new)["source"] == {"kind": "test"}
    assert upgrade.main([new, str(tmp_path / "again")]) == 1  # not a version-1 dataset: one error line


def test_generated_written_read_back_bit_identical(ref):
    meta = ds.open_dataset(ref)
    assert meta["complete"] and meta["num_samples"] == N and len(meta["shards"]) == 3
    assert meta["features"]["latents"] == {"shape": [2, 4, 4, 4], "dtype": "float32"}
    assert meta["features"]["ode_traj"]["shape"] == [4, 2, 4, 4, 4]
    assert meta["source"]["teacher"]["checkpoint"].startswith("random-init")
    cols, texts = ds.read_all(ref)
    np.testing.assert_array_equal(cols["id"], np.arange(N))
    # Recompute samples straight from the teacher: the stored bytes are exactly those.
    gen = G.Generator(gen_config(), DEVICES)
    for lo in range(0, N, 2):
        arrays, t = gen.samples(np.arange(lo, min(lo + 2, N)))
        for k, v in arrays.items():
            assert cols[k][lo : lo + 2].tobytes() == v.tobytes(), k
        assert [x["prompt"] for x in texts[lo : lo + 2]] == t
    # The toy prompts/actions are those of the world episodes.
    ep = tw.sample_episode(jax.random.fold_in(jax.random.key(1), 3), gen.cond.world)
    np.testing.assert_array_equal(cols["actions"][3], np.asarray(ep.actions))
    np.testing.assert_array_equal(cols["prompt_tokens"][3], np.asarray(ep.prompt))
    # Teacher trajectory: last ODE point is at the smallest few-step time, not the endpoint.
    assert np.all(np.isfinite(cols["latents"])) and not np.array_equal(cols["ode_traj"][:, -1], cols["latents"])
    # The training source returns the same bytes, with the model-facing fields.
    src = ds.DatasetSource(ref, 4, seed=3, mcfg=mcfg(), process_index=0, process_count=1)
    b = src.batch(1)
    assert set(b) == {"id", "latents", "context", "actions", "ode_traj", "ode_times"}
    assert b["latents"].shape == (4, 2, 4, 4, 4) and b["ode_traj"].shape == (4, 4, 2, 4, 4, 4)
    np.testing.assert_array_equal(b["ode_times"], np.float32(meta["ode_times"]))
    for k in ("latents", "context", "actions", "ode_traj"):
        assert b[k].tobytes() == cols[k][b["id"]].tobytes()
    np.testing.assert_array_equal(src.negative_context(), np.zeros((8, 32), np.float32))
    assert src.latent_shape == (2, 4, 4, 4)


def test_crash_midway_and_restart_complete_no_duplicates(ref, tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_gen(gen_config(), out, crash_after_records=6)  # shard 0 done, shard 1 half written
    names = sorted(os.listdir(out))
    assert ds.shard_name(0, 3) in names and ds.shard_name(1, 3) not in names
    assert any(n.startswith(f".{ds.shard_name(1, 3)}.tmp") for n in names)  # the shard in progress
    with pytest.raises(ds.DatasetError, match="incomplete"):
        ds.open_dataset(str(out))
    shard0 = (out / ds.shard_name(0, 3)).read_bytes()
    assert run_gen(gen_config(), out, max_shards=1) == {"written": 1, "pending": 1, "complete": False}
    assert run_gen(gen_config(), out) == {"written": 1, "pending": 0, "complete": True}
    assert run_gen(gen_config(), out) == {"written": 0, "pending": 0, "complete": True}  # idempotent
    assert (out / ds.shard_name(0, 3)).read_bytes() == shard0  # complete shards never rewritten
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    cols, _ = ds.read_all(str(out))
    np.testing.assert_array_equal(cols["id"], np.arange(N))  # no duplicate, none missing
    ref_cols, _ = ds.read_all(ref)
    for k in ref_cols:
        assert cols[k].tobytes() == ref_cols[k].tobytes(), k


def test_two_hosts_write_their_shards(ref, tmp_path):
    out = tmp_path / "ds"
    assert run_gen(gen_config(), out, process_index=1, process_count=2)["complete"] is False
    # process 1 of 2 owns the block process_rows(3 shards, 1, 2) = [1, 3)
    assert sorted(n for n in os.listdir(out) if ds.is_shard(n)) == [
        ds.shard_name(1, 3),
        ds.shard_name(2, 3),
    ]
    assert run_gen(gen_config(), out, process_index=0, process_count=2)["complete"] is True
    cols, _ = ds.read_all(str(out))
    assert cols["latents"].tobytes() == ds.read_all(ref)[0]["latents"].tobytes()


def test_two_hosts_read_their_rows_of_the_global_batch(ref):
    one = ds.DatasetSource(ref, 4, seed=0, process_index=0, process_count=1)
    stream = [int(one.sample(k)["id"]) for k in range(2 * N)]
    assert sorted(stream[:N]) == sorted(stream[N:]) == list(range(N))  # each epoch a permutation
    assert stream[:N] != list(range(N)) or stream[N:] != stream[:N]  # shuffled, reshuffled per epoch
    hosts = [ds.DatasetSource(ref, 4, seed=0, process_index=p, process_count=2) for p in range(2)]
    for step in range(5):  # batches walk the stream, straddling epoch ends; host p has rows [2p, 2p + 2)
        want = one.batch(step)
        np.testing.assert_array_equal(want["id"], stream[4 * step : 4 * step + 4])
        parts = [h.batch(step) for h in hosts]
        assert all(b["latents"].shape[0] == 2 for b in parts)
        np.testing.assert_array_equal(parts[1]["ode_times"], want["ode_times"])  # not a batch field
        for k in set(want) - {"ode_times"}:
            assert np.concatenate([b[k] for b in parts]).tobytes() == want[k].tobytes(), k
    unshuffled = ds.DatasetSource(ref, 4, shuffle=False, process_index=1, process_count=2)
    np.testing.assert_array_equal(unshuffled.batch(0)["id"], [2, 3])
    with pytest.raises(ValueError, match="batch size 3 does not divide over 2 processes"):
        ds.DatasetSource(ref, 3, process_index=0, process_count=2)


def test_iterator_state_save_restore_resumes_exactly(ref):
    src = ds.DatasetSource(ref, 4, seed=7)
    it = src.iterator()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(4)]
    it2 = ds.DatasetSource(ref, 4, seed=7).iterator(state)
    for e in expected:
        got = next(it2)
        assert set(got) == set(e) and all(got[k].tobytes() == e[k].tobytes() for k in e)
    assert it2.get_state()["step"] == 7
    other = ds.DatasetSource(ref, 4, seed=8)
    assert not np.array_equal(other.batch(3)["id"], expected[0]["id"]) or not np.array_equal(
        other.batch(4)["id"], expected[1]["id"]
    )
    with pytest.raises(ValueError, match="seed"):
        other.iterator(state)


# ----------------------------------------------------------------------------- bad input


def test_unreadable_or_foreign_directory_errors_name_the_file(ref, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ds.DatasetError, match="nope"):
        ds.DatasetSource(missing, 2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(ds.DatasetError, match=r"foreign/metadata\.json.*not found"):
        ds.open_dataset(str(foreign))
    # Generating into it is refused and its contents stay.
    with pytest.raises(ds.DatasetError, match="foreign"):
        run_gen(gen_config(), foreign)
    assert os.listdir(foreign) == ["notes.txt"]
    (foreign / "metadata.json").write_text("{not json")
    with pytest.raises(ds.DatasetError, match=r"foreign/metadata\.json"):
        ds.open_dataset(str(foreign))
    (foreign / "metadata.json").write_text(json.dumps({"format": "tfds"}))
    with pytest.raises(ds.DatasetError, match=r"metadata\.json.*not crm_jax"):
        ds.open_dataset(str(foreign))
    broken = tmp_path / "broken"
    shutil.copytree(ref, broken)
    (broken / ds.shard_name(1, 3)).write_bytes(b"\0" * 100)
    with pytest.raises(ds.DatasetError, match=ds.shard_name(1, 3)):
        ds.open_dataset(str(broken))
    shutil.copy(os.path.join(ref, ds.shard_name(1, 3)), broken / ds.shard_name(1, 3))
    os.remove(broken / ds.shard_name(2, 3))
    with pytest.raises(ds.DatasetError, match=rf"{ds.shard_name(2, 3)}.*is missing"):
        ds.DatasetSource(str(broken), 2)


def test_dataset_shapes_disagreeing_with_model_config(ref):
    with pytest.raises(ds.DatasetError, match=r"metadata\.json.*context.*\[8, 32\].*\[8, 16\]"):
        ds.DatasetSource(ref, 2, mcfg=mcfg().replace(text_dim=16))
    with pytest.raises(ds.DatasetError, match=r"metadata\.json.*4 channels.*in_channels=12"):
        ds.DatasetSource(ref, 2, mcfg=mcfg().replace(in_channels=12, out_channels=12))
    with pytest.raises(ds.DatasetError, match="patch_size"):
        ds.DatasetSource(ref, 2, mcfg=mcfg().replace(patch_size=(1, 3, 3)))
    with pytest.raises(ds.DatasetError, match="num_actions=3"):
        ds.DatasetSource(ref, 2, mcfg=mcfg().replace(num_actions=3))
    src = ds.DatasetSource(ref, 2, mcfg=mcfg().replace(num_actions=0))  # actions dropped
    assert "actions" not in src.batch(0)


def test_restart_with_other_settings_is_refused_and_keeps_data(ref, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(ref, out)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(ds.DatasetError, match=r"metadata\.json.*different dataset.*num_samples"):
        run_gen(gen_config(num_samples=12), out)
    with pytest.raises(ValueError, match="in_channels"):
        run_gen(gen_config(latent_shape=(2, 4, 4, 3)), out)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_prompt_file_bad_lines_name_file_and_line(tmp_path):
    world = tw.ToyWorldConfig(num_frames=3)
    f = tmp_path / "prompts.txt"
    f.write_text("# toy prompts\nscene=1 color=3\n\nscene=0 color=red | up 2 right\n")
    lines = pr.read_toy_prompt_file(str(f), world)
    assert [(l.line, s, c, l.actions) for l, s, c in lines] == [(2, 1, 3, None), (4, 0, 0, (1, 2, 4))]
    cases = {
        "scene=1 color=3 | up jump stay\n": "jump",
        "scene=1 color=3 | up up\n": "2 actions given, expected one per frame",
        "scene=9 color=3\n": "scene 9 out of range",
        "scene=1 colour=3\n": "scene=<id> color",
        "scene=1 color=3 | 0 1 7\n": "action id 7",
        " | up up up\n": "empty prompt",
    }
    for text, msg in cases.items():
        f.write_text("scene=0 color=1\n# ok\n" + text)
        with pytest.raises(ValueError, match=rf"prompts\.txt:3: .*{msg}"):
            pr.read_toy_prompt_file(str(f), world)
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        pr.read_prompt_file(str(f))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        pr.read_prompt_file(str(tmp_path / "missing.txt"))
    free = tmp_path / "wan.txt"
    free.write_text("a cat on grass\na dog | 1, 2\n")
    assert [(p.prompt, p.actions) for p in pr.read_prompt_file(str(free))] == [
        ("a cat on grass", None),
        ("a dog", (1, 2)),
    ]


def test_generate_from_toy_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("scene=1 color=3 | up right\nscene=2 color=blue\n")
    c = gen_config(num_samples=3, samples_per_shard=3, **{"cond.kind": "toy_prompts", "cond.prompt_file": str(f)})
    out = tmp_path / "ds"
    assert run_gen(c, out)["complete"]
    cols, texts = ds.read_all(str(out))
    assert [t["prompt"] for t in texts] == ["scene=1 color=3", "scene=2 color=2", "scene=1 color=3"]
    np.testing.assert_array_equal(cols["actions"][0], [1, 4])
    assert "states" not in cols
    f.write_text("scene=1 color=3 | up right\nscene=2 color=navy\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: .*navy"):
        run_gen(c, tmp_path / "ds2")
    assert not os.path.exists(tmp_path / "ds2")  # nothing written on bad input


def test_generate_from_teacher_checkpoint(tmp_path):
    from flax import nnx

    from crm_jax.models import convert
    from crm_jax.models.wan import WanModel

    model = nnx.eval_shape(lambda: WanModel(mcfg(), rngs=nnx.Rngs(0)))
    nnx.update(model, G.random_teacher(mcfg(), 3)[1])
    convert.save_nnx(model, str(tmp_path / "teacher"))
    c = gen_config(teacher=str(tmp_path / "teacher"), allow_random_teacher=False, num_samples=2)
    assert run_gen(c, tmp_path / "ds")["complete"]
    teacher = ds.read_metadata(str(tmp_path / "ds"))["source"]["teacher"]
    assert teacher["checkpoint"] == str(tmp_path / "teacher") and len(teacher["fingerprint"]) == 16
    c.model.overrides = dict(SMALL, text_dim=16)
    with pytest.raises(ValueError, match="teacher checkpoint .*teacher.* has model config"):
        run_gen(c, tmp_path / "ds2")
    assert not os.path.exists(tmp_path / "ds2")


def test_generate_from_embedding_file_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    emb = tmp_path / "emb.npz"
    np.savez(
        emb,
        context=rng.normal(size=(3, 8, 32)).astype(np.float32),
        prompts=np.array(["a", "b", "c"]),
        actions=np.array([[0, 1], [2, 3], [4, 0]]),
        negative_context=np.zeros((8, 32), np.float32),
    )
    c = gen_config(
        num_samples=4,
        samples_per_shard=4,
        latent_dtype="bfloat16",
        **{"cond.kind": "embeddings", "cond.embeddings": str(emb)},
    )
    assert run_gen(c, tmp_path / "ds")["complete"]
    cols, texts = ds.read_all(str(tmp_path / "ds"))
    assert cols["latents"].dtype.name == "bfloat16" and cols["ode_traj"].dtype.name == "bfloat16"
    assert [t["prompt"] for t in texts] == ["a", "b", "c", "a"]
    np.testing.assert_array_equal(cols["actions"][3], [0, 1])
    np.testing.assert_array_equal(cols["context"][3], np.load(emb)["context"][0])
    b = ds.DatasetSource(str(tmp_path / "ds"), 2, mcfg=mcfg()).batch(0)
    assert b["latents"].dtype.name == "bfloat16"
    np.savez(emb, context=np.zeros((3, 8, 16), np.float32))
    with pytest.raises(ValueError, match=r"emb\.npz.*\[n, 8, 32\]"):
        run_gen(c, tmp_path / "ds2")


# ----------------------------------------------------------------------------- converter


def _external_dir(path, n=3, fmt="npz", C=4, T=2, H=4, W=4, L=6, Dm=32):
    path.mkdir()
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        lat = rng.normal(size=(C, T, H, W)).astype(np.float32)
        emb = rng.normal(size=(L, Dm)).astype(np.float32)
        prompt = f"prompt number {i}"
        if fmt == "npz":
            np.savez(path / f"sample_{i:03d}.npz", latent=lat, prompt_embed=emb, prompt=np.asarray(prompt))
        else:
            from safetensors.numpy import save_file

            save_file(
                {"latent": lat, "prompt_embed": emb},
                str(path / f"sample_{i:03d}.safetensors"),
                metadata={"prompt": prompt},
            )
        out.append((lat, emb, prompt))
    return out


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_external_converter_round_trip(tmp_path, fmt):
    samples = _external_dir(tmp_path / "src", fmt=fmt)
    np.savez(tmp_path / "neg.npz", prompt_embed=np.ones((5, 32), np.float32))
    out = str(tmp_path / "ds")
    res = external.convert(
        str(tmp_path / "src"), out, samples_per_shard=2, text_len=8, negative=str(tmp_path / "neg.npz"), progress=False
    )
    assert res == {"written": 2, "complete": True}
    cols, texts = ds.read_all(out)
    for i, (lat, emb, prompt) in enumerate(samples):
        assert cols["latents"][i].tobytes() == np.moveaxis(lat, 0, -1).tobytes()  # channels last
        np.testing.assert_array_equal(cols["context"][i][:6], emb)
        np.testing.assert_array_equal(cols["context"][i][6:], 0)  # padded like umT5 outputs
        assert texts[i] == {"prompt": prompt, "file": f"sample_{i:03d}.{fmt}"}
    src = ds.DatasetSource(out, 2, mcfg=TINY, process_index=0, process_count=1)
    assert src.batch(0)["latents"].shape == (2, 2, 4, 4, 4)
    np.testing.assert_array_equal(src.negative_context()[:5], 1)
    assert (
        external.convert(
            str(tmp_path / "src"),
            out,
            samples_per_shard=2,
            text_len=8,
            negative=str(tmp_path / "neg.npz"),
            progress=False,
        )["written"]
        == 0
    )


def test_external_converter_bad_files(tmp_path):
    _external_dir(tmp_path / "src")
    np.savez(
        tmp_path / "src" / "sample_001.npz",
        latent=np.zeros((4, 2, 4, 5), np.float32),
        prompt_embed=np.zeros((6, 32), np.float32),
    )
    with pytest.raises(ValueError, match=r"sample_001\.npz.*latents.*\[2, 4, 5, 4\].*\[2, 4, 4, 4\]"):
        external.convert(str(tmp_path / "src"), str(tmp_path / "ds"), samples_per_shard=2, progress=False)
    assert ds.shard_name(0, 2) not in os.listdir(tmp_path / "ds")  # the failed shard left no file
    np.savez(tmp_path / "src" / "sample_001.npz", latent=np.zeros((4, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"sample_001\.npz.*prompt_embed"):
        external.convert(str(tmp_path / "src"), str(tmp_path / "ds1"), samples_per_shard=2, progress=False)
    (tmp_path / "src" / "sample_001.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"cannot read sample file .*sample_001\.npz"):
        external.convert(str(tmp_path / "src"), str(tmp_path / "ds2"), samples_per_shard=2, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no per-sample"):
        external.convert(str(tmp_path / "empty"), str(tmp_path / "ds3"), progress=False)
