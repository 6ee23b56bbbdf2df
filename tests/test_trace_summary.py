"""experiments/trace_summary.py on a synthetic trace: categories, idle time and its gaps."""

import gzip
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import trace_summary  # noqa: E402


def write_trace(tmp_path, kernels, launches):
    """A perfetto-style trace: one GPU stream line and one host thread with launch calls."""
    meta = [
        dict(ph="M", name="process_name", pid=1, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="thread_name", pid=1, tid=7, args=dict(name="Stream #13(Compute)")),
        dict(ph="M", name="process_name", pid=2, args=dict(name="/host:CPU")),
        dict(ph="M", name="thread_name", pid=2, tid=3, args=dict(name="python")),
    ]
    ev = [dict(ph="X", pid=1, tid=7, name=n, ts=ts, dur=d, args={"correlation id": str(c)}) for n, ts, d, c in kernels]
    ev += [
        dict(ph="X", pid=2, tid=3, name="cuLaunchKernel", ts=ts, dur=d, args={"correlation_id": c})
        for c, ts, d in launches
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "perfetto_trace.json.gz", "wt") as f:
        json.dump(dict(traceEvents=meta + ev), f)
    return str(tmp_path)


def test_summary_and_gaps(tmp_path):
    # us: gemm [0, 100), 3 us gap, fusion [103, 113), 20 us gap, flash [133, 233),
    # 2 ms gap (between steps), gemm [2233, 2333)
    kernels = [
        ("nvjet_sm90_gemm", 0, 100, 1),
        ("loop_add_fusion", 103, 10, 2),
        ("crm_flash_fwd", 133, 100, 3),
        ("nvjet_sm90_gemm", 2233, 100, 4),
    ]
    # fusion launched long before it ran (device gap); flash's launch returned 15 us after the
    # fusion ended (host late for 15 of its 20 us)
    launches = [(1, -50, 5), (2, -40, 5), (3, 120, 8), (4, 1000, 5)]
    s = trace_summary.summarize(write_trace(tmp_path, kernels, launches), per=2)
    assert s["busy_ms"] == pytest.approx(310 / 2e3)
    assert s["categories"]["matmul"]["ms"] == pytest.approx(0.1)
    assert s["categories"]["attention"]["ms"] == pytest.approx(0.05)
    assert s["categories"]["other"]["ms"] == pytest.approx(0.005)
    assert s["idle_ms"] == pytest.approx((3 + 20 + 2000) / 2e3, abs=1e-3)  # rounded to us
    g = s["gaps"]
    assert g["within_ms"] == pytest.approx(23 / 2e3, abs=1e-3) and g["between_ms"] == pytest.approx(1.0)
    assert g["short_gaps"] == 1.0
    assert g["hist"]["2-5us"]["gaps"] == 0.5 and g["hist"]["10-50us"]["ms"] == pytest.approx(0.01)
    assert g["top_waiting"][0]["name"] == "crm_flash_fwd"
    assert g["host_late_ms"] == pytest.approx(15 / 2e3, abs=1e-3) and g["device_ms"] == pytest.approx(8 / 2e3, abs=1e-3)
    assert g["launch_matched"] == 1.0
    text = trace_summary.fmt(s)
    assert "host late" in text and "crm_flash_fwd" in text


def test_no_device_events_is_a_clear_error(tmp_path):
    path = write_trace(tmp_path, [], [(1, 0, 5)])
    with pytest.raises(ValueError, match="no device stream events"):
        trace_summary.summarize(path)
