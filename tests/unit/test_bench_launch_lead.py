"""bench/launch_lead.py: the host's lead over the GPU, read from a profiled timeline."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from launch_lead import analyse, load, report  # noqa: E402


def _timeline() -> list[dict]:
    """Two steps. Step 0: the main thread launches 3 kernels 1 ms ahead of the GPU. Step 1: the
    backward thread launches 2 kernels the GPU starts at once, after 0.5 ms idle each, then a
    synchronize blocks for 2 ms."""
    ev = [{"ph": "X", "name": "forward_backward", "cat": "user_annotation", "ts": 0.0, "dur": 10.0, "tid": 1},
          {"ph": "X", "name": "forward_backward", "cat": "user_annotation", "ts": 5000.0, "dur": 10.0, "tid": 1},
          # the GPU's copy of the range, which must not start a step of its own
          {"ph": "X", "name": "forward_backward", "cat": "gpu_user_annotation", "ts": 1105.0, "dur": 300.0, "tid": 7}]
    corr = 0
    for i in range(3):  # launched at 100, 200, 300 us; run 1,000 us later, 100 us each
        corr += 1
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100.0 * (i + 1), "dur": 5.0,
                   "tid": 1, "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "kernel", "name": "k", "ts": 1105.0 + 100.0 * i, "dur": 100.0, "tid": 7,
                   "args": {"correlation": corr}})
    t = 5000.0
    for _ in range(2):
        corr += 1
        t += 500.0
        ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": t, "dur": 5.0, "tid": 2,
                   "args": {"correlation": corr}})
        ev.append({"ph": "X", "cat": "kernel", "name": "k", "ts": t + 10.0, "dur": 100.0, "tid": 7,
                   "args": {"correlation": corr}})
    ev.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 6500.0, "dur": 2000.0,
               "tid": 1})
    return ev


def test_leads_idle_and_blocking_calls(tmp_path: Path) -> None:
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": _timeline()}).encode()))
    result = analyse(load(path))
    one, two = result["threads"]
    assert (one["step"], one["thread"], one["kernels"]) == (0, 1, 3)
    assert one["lead_ms"]["p50"] == 1.0 and one["started_at_once"] == 0.0
    assert (two["step"], two["thread"], two["kernels"]) == (1, 2, 2)
    assert two["started_at_once"] == 1.0 and two["lead_ms"]["p95"] == 0.005
    # The GPU waited from the last kernel of step 0 (ends 1,405) to 5,510, then 390 us.
    assert two["gpu_idle_ms"] == round((5510.0 - 1405.0 + 390.0) / 1000, 2)
    assert result["blocking"] == [{"call": "cudaStreamSynchronize", "count": 1, "ms": 2.0}]
    assert [s["kernels"] for s in result["steps"]] == [3, 2]
    assert "| 1 | 2 | 2 |" in report(result, "t")
