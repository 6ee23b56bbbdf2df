"""experiments/bench_toy_teacher.py: its CPU smoke run writes sane rows; bad variants are refused."""

import json

import pytest

from experiments import bench_toy_teacher as btt


def test_quick_run_writes_a_row_per_variant(tmp_path):
    out = tmp_path / "btt.json"
    btt.main(["--quick", "--variants", "xla_attn,study", "--iters", "2", "--repeats", "1", "--out", str(out)])
    rows = json.load(open(out))["rows"]
    assert [r["variant"] for r in rows] == ["xla_attn", "study"]
    r = rows[0]
    assert r["attn_impl"] == "xla" and r["dtype"] == "float32" and r["batch"] == 8
    assert (r["dim"], r["layers"]) == (128, 3)  # the variant names its model
    assert (rows[1]["dim"], rows[1]["layers"], rows[1]["dtype"]) == (192, 4, "bfloat16")  # toy_study's
    for r in rows:
        assert r["step_ms"] > 0 and r["loop_ms"] > 0 and r["data_ms"] > 0 and r["clips_s"] > 0
        assert r["loss"] == r["loss"]  # finite: not NaN


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        btt.main(["--quick", "--variants", "nope"])
