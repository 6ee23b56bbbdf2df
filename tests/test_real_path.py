"""The real Wan2.1 path end to end, at test size, through the command-line entry points:

convert the DiT (diffusers layout) -> encode prompts with umT5 -> generate a dataset with the
teacher -> TF-sCM 2 iterations -> SF-DMD 1 iteration (a DMD student step) -> sample through the
VAE to MP4.

Inputs are the committed tiny fixtures (tests/fixtures: wan_tiny, wan_vae_tiny, umt5_tiny),
laid out in a temp dir as a downloaded diffusers pipeline (configs/base.py `WAN_PATHS`); the
stages run with configs/wan_tiny_e2e.py, the test-size variant of the Wan configs. The CLIs run
in-process (`main(argv)` / `cli(argv)`), which shares JAX's start-up between stages.
"""

import os
import shutil
import time

import numpy as np
import pytest

from configs.base import wan_paths
from crm_jax import main as train_main
from crm_jax import sample
from crm_jax.data import generate
from crm_jax.inputs import MissingInputError
from crm_jax.tools import convert_wan, encode_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
CONFIG = os.path.join(ROOT, "configs", "wan_tiny_e2e.py")
PROMPTS = "a red fox runs through snow\na boat on a calm lake at dawn\n"


def pipeline_layout(root: str) -> dict:
    """The tiny fixtures where a downloaded Wan2.1 diffusers pipeline would be; returns the paths."""
    p = wan_paths(root)
    shutil.copytree(os.path.join(FIX, "wan_tiny", "diffusers"), p["transformer"])
    shutil.copytree(os.path.join(FIX, "wan_vae_tiny", "diffusers"), p["vae"])
    shutil.copytree(os.path.join(FIX, "umt5_tiny", "transformers"), p["text_encoder"])
    shutil.copytree(os.path.join(FIX, "umt5_tiny", "tokenizer"), p["tokenizer"])
    os.makedirs(os.path.dirname(p["prompts"]), exist_ok=True)
    with open(p["prompts"], "w") as f:
        f.write(PROMPTS)
    return p


def test_real_path_to_mp4(tmp_path, capsys):
    import imageio.v2 as iio

    root = str(tmp_path)
    p = pipeline_layout(root)
    times = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        return out

    # 1. convert the DiT (text_len: the tiny umT5's max_len below)
    assert (
        stage("convert", lambda: convert_wan.main(["--src", p["transformer"], "--dst", p["dit"], "--text_len", "8"]))
        == 0
    )
    # 2. encode prompts (VAE and umT5 are read in their published layouts, no conversion)
    emb_dir = os.path.dirname(p["embeddings"])
    assert (
        stage(
            "encode",
            lambda: encode_prompts.main(
                [
                    "--encoder",
                    p["text_encoder"],
                    "--tokenizer",
                    p["tokenizer"],
                    "--prompts",
                    p["prompts"],
                    "--out",
                    emb_dir,
                    "--max_len",
                    "8",
                    "--batch_size",
                    "2",
                    "--dtype",
                    "float32",
                    "--no_progress",
                ]
            ),
        )
        == 0
    )
    emb = np.load(p["embeddings"])
    assert emb["context"].shape == (2, 8, 32)
    # 3. synthetic data from the teacher
    res = stage(
        "generate", lambda: generate.cli(["generate", f"--config={CONFIG}:generate,{root}", f"--out={p['dataset']}"])
    )
    assert res["complete"]
    # 4. TF-sCM from the converted teacher, 5. SF-DMD from its export
    for mode, iters in (("tf_scm", 2), ("sf_dmd", 1)):
        stage(mode, lambda: train_main.cli(["main", f"--config={CONFIG}:{mode},{root}", f"--workdir={p[mode]}"]))
        assert os.path.exists(os.path.join(p[mode], "export", "wan_config.json"))
        assert f"{mode}: {iters} iterations ({iters} student steps, 0 skipped)" in capsys.readouterr().out
    # 6. stream the student through the VAE into an MP4: 3 latent frames -> 1 + 4 * 2 = 9 frames
    out = os.path.join(root, "videos", "fox.mp4")
    gif = out[:-4] + ".gif"
    summary = stage(
        "sample",
        lambda: sample.main(
            [
                "--ckpt",
                os.path.join(p["sf_dmd"], "export"),
                "--vae",
                p["vae"],
                "--embeddings",
                p["embeddings"],
                "--rows",
                "0",
                "--frames",
                "3",
                "--block_frames",
                "1",
                "--steps",
                "2",
                "--latent_hw",
                "4,4",
                "--out",
                f"{out},{gif}",
            ]
        ),
    )
    assert summary["outputs"] == [out, gif] and summary["video_frames"] == 9
    reader = iio.get_reader(out)
    frames = [f for f in reader]
    reader.close()
    assert len(frames) == 9
    assert frames[0].shape == (32, 32, 3)
    gif_frames = iio.mimread(gif)
    assert len(gif_frames) == 9 and gif_frames[0].shape[:2] == (32, 32)
    # the MP4 (lossy) shows the GIF's (exact) frames
    diff = np.abs(np.asarray(frames, np.float32) - np.asarray(gif_frames, np.float32)[..., :3]).mean()
    print("mp4 vs gif mean abs diff", diff)
    assert diff < 12
    print("stage seconds:", {k: round(v, 1) for k, v in times.items()})


def test_missing_inputs_fail_early(tmp_path):
    """Each entry point names the missing config field / flag and path before touching anything."""
    root = str(tmp_path / "empty")
    p = wan_paths(root)
    with pytest.raises(MissingInputError) as e:
        generate.cli(["generate", f"--config={CONFIG}:generate,{root}", f"--out={p['dataset']}"])
    msg = str(e.value)
    assert "config.teacher" in msg and p["dit"] in msg and "config.cond.embeddings" in msg
    assert not os.path.exists(p["dataset"])

    with pytest.raises(MissingInputError) as e:
        train_main.cli(["main", f"--config={CONFIG}:sf_dmd,{root}", f"--workdir={p['sf_dmd']}"])
    msg = str(e.value)
    for field in ("config.data.path", "config.init.student", "config.init.teacher", "config.init.dmd_teacher"):
        assert field in msg
    assert p["dataset"] in msg and "no such file or directory" in msg
    assert not os.path.exists(p["sf_dmd"])

    # a directory that exists but is no checkpoint is named too
    os.makedirs(p["dit"])
    with pytest.raises(MissingInputError, match=r"config.init.teacher = .*holds no config.json"):
        train_main.cli(["main", f"--config={CONFIG}:tf_scm,{root}", f"--workdir={p['tf_scm']}"])

    out = str(tmp_path / "v.mp4")
    with pytest.raises(MissingInputError, match=r"--vae = .*no_vae.*no such file"):
        sample.main(["--random_init", "--vae", str(tmp_path / "no_vae"), "--out", out])
    assert not os.path.exists(out)
