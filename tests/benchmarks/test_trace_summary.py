"""benchmarks/trace_summary.py on a synthetic Chrome trace: device timelines only, busy
time as the union of overlapping kernels, ops grouped by hlo_op and kind."""

import gzip
import json

import pytest

from benchmarks import trace_summary as ts


def _trace():
    dev, host = 1, 2
    meta = [
        {"ph": "M", "pid": dev, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": host, "name": "process_name", "args": {"name": "/host:CPU"}},
    ]
    x = lambda pid, ts, dur, name, op=None: {
        "ph": "X", "pid": pid, "tid": 0, "ts": ts, "dur": dur, "name": name,
        **({"args": {"hlo_op": op}} if op else {}),
    }  # fmt: skip
    spans = [
        x(dev, 0, 100, "sm90_xmma_gemm_bf16", "custom-call.3"),
        x(dev, 50, 100, "sm90_xmma_gemm_bf16", "custom-call.3"),  # overlaps the first
        x(dev, 300, 40, "ncclDevKernel_AllToAll", "all-to-all-start.1"),
        x(dev, 400, 60, "loop_add_fusion", "fusion.7"),
        # one op, a helper kernel first: its kind comes from its longest-running kernel
        x(dev, 500, 5, "redzone_copy_kernel", "custom-call.9"),
        x(dev, 505, 45, "nvjet_hsh_128x256", "custom-call.9"),
        x(host, 0, 5000, "PjitFunction(jit(step))"),  # host: not device time
    ]
    return {"traceEvents": meta + spans}


def test_summary_counts_device_time_by_op_and_kind(tmp_path):
    s = ts.summarize(_trace())
    assert s["timelines"] == ["/device:GPU:0"]
    assert s["busy_us"]["/device:GPU:0"] == 150 + 40 + 60 + 50  # union, not summed
    assert s["ops"]["custom-call.3"] == (200.0, 2, "matmul", "sm90_xmma_gemm_bf16")
    assert s["ops"]["custom-call.9"] == (50.0, 2, "matmul", "nvjet_hsh_128x256")
    assert s["ops"]["all-to-all-start.1"][2] == "collective"
    assert s["ops"]["fusion.7"][2] == "fusion (elementwise)"
    path = tmp_path / "plugins" / "profile" / "run" / "h.trace.json.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    text = ts.main([str(tmp_path), "--steps", "2"])
    assert "| /device:GPU:0 | 0.15 |" in text  # 300 us over 2 steps
    assert "| matmul | 0.12 | 71.4% |" in text
    assert "| `custom-call.9` | matmul | `nvjet_hsh_128x256` | 1 | 0.025 | 14.3% |" in text
    with pytest.raises(FileNotFoundError, match="trace.json.gz"):
        ts.find_trace(str(tmp_path / "plugins" / "none"))
    with pytest.raises(ValueError, match="--steps must be >= 1, got 0"):
        ts.main([str(tmp_path), "--steps", "0"])
