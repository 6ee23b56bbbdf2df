"""experiments/bench_streaming.py on CPU (--quick): the variant flags run, --compare reads the results,
the video modes save and check videos."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import bench_streaming  # noqa: E402

COMMAND_BUFFERS = (
    "xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL"
)


def test_quick_variants_and_compare(tmp_path, capsys):
    variants = {
        "base": ["--profile", str(tmp_path / "trace")],
        "cache_xla": ["--cache_attn_impl", "xla"],
        "command_buffers": ["--compiler_option", COMMAND_BUFFERS],
    }
    outs = []
    for label, flags in variants.items():
        out = tmp_path / f"{label}.json"
        bench_streaming.main(
            [
                "--quick",
                "--blocks",
                "3",
                "--configs",
                "2:noisy,1:clean",
                "--repeats",
                "1",
                "--label",
                label,
                *flags,
                "--out",
                str(out),
            ]
        )
        with open(out) as f:
            result = json.load(f)
        rows = result["rows"]
        assert [(r["steps"], r["context"]) for r in rows] == [(2, "noisy"), (1, "clean")]
        assert all(r["variant"] == label and r["steady_fps"] > 0 and r["dispatch_ms"] >= 0 for r in rows)
        assert result["options"]["cache_attn_impl"] == ("xla" if label == "cache_xla" else "auto")
        outs.append(str(out))
    assert rows[0]["traced_cache_len"] and rows[0]["compiler_options"]["xla_gpu_enable_command_buffer"]
    capsys.readouterr()
    bench_streaming.main(["--compare", *outs, str(tmp_path / "missing.json"), "--compare_key", "tiny:3:2:noisy"])
    text = capsys.readouterr().out
    assert "skipping" in text and all(label in text for label in variants)
    best = text.strip().splitlines()[-1]
    assert best.startswith("best: ") and best[6:] in variants


def test_save_and_check_videos(tmp_path, capsys):
    flags = ["--quick", "--models", "tiny,wan_small", "--blocks", "3", "--configs", "1:clean"]
    bench_streaming.main([*flags, "--save_videos", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["tiny_chunk3_1steps_clean.npy", "wan_small_chunk3_1steps_clean.npy"]
    capsys.readouterr()
    bench_streaming.main([*flags, "--check_videos", str(tmp_path)])
    assert capsys.readouterr().out.count("max |diff| 0.000e+00") == 2
    np.save(tmp_path / names[0], np.load(tmp_path / names[0]) + 1e-3)
    with pytest.raises(SystemExit, match="1 video"):
        bench_streaming.main([*flags, "--check_videos", str(tmp_path)])
