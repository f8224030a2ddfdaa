"""The throughput benches judge steps by the median: a job against the step bench's median step, and each
stalled step listed with what the host did over it."""

from __future__ import annotations

import pytest

from bench.service_throughput import _bench_line, bench_reference


def _row(step_s: list[float], tokens_per_step: int = 16384) -> dict:
    return {"name": "tuneq-qlora-lean", "step_s": step_s, "peak_gib": 3.4,
            "tokens_per_second": tokens_per_step * len(step_s) / sum(step_s)}


def test_a_stalled_step_moves_the_rows_mean_but_not_the_reference():
    steady = _row([0.3] * 19 + [0.3])
    stalled = _row([0.3] * 19 + [0.9])
    assert bench_reference(steady) == pytest.approx(16384 / 0.3)
    assert bench_reference(stalled) == pytest.approx(16384 / 0.3)
    assert stalled["tokens_per_second"] < 0.95 * bench_reference(stalled)
    line = _bench_line(stalled)
    assert "54,613 tokens/s at its median step" in line and "1 of its 20 steps under 85 %" in line, line
    assert "(worst 0.33)" in line


def test_a_row_without_its_steps_keeps_its_own_figure():
    assert bench_reference({"name": "x", "tokens_per_second": 1234.0}) == 1234.0
    assert bench_reference({"name": "x", "error": "not run"}) is None
    assert "None tokens/s" in _bench_line({"name": "x", "error": "not run"})


def test_the_step_bench_lists_its_stalled_steps_with_their_cpu_and_steal():
    from bench.train_throughput import stalled_steps

    row = {"step_s": [0.3, 0.3, 0.6, 0.31, 0.3], "step_cpu_s": [0.1, 0.1, 0.12, 0.1, 0.1],
           "step_steal_s": [0.0, 0.0, 0.25, 0.0, 0.0], "step_enqueued_s": [0.05, 0.05, 0.45, 0.06, 0.05],
           "step_usage": [{"sys_s": 0.01, "minflt": 2}] * 2 + [{"sys_s": 0.2, "minflt": 900}]
           + [{"sys_s": 0.01, "minflt": 3}] * 2,
           "blocking_sync": True}
    lines = stalled_steps({"tuneq-qlora-lean": row, "no-steps": {"tokens_per_second": 1.0}})
    listed = [x for x in lines if x.startswith("- ")]
    assert len(listed) == 1 and "1 of 5 steps under 85 %" in listed[0], lines
    assert listed[0].startswith("- tuneq-qlora-lean (blocking sync):"), listed[0]
    assert "step 3: 0.6000 s, enqueued 0.45 s, CPU 0.12 s, steal 0.25 s, sys_s 0.2, minflt 900" in listed[0]
    assert "enqueued 0.05 s; CPU 0.1 s, sys_s 0.01, minflt 3)" in listed[0], listed[0]
    assert stalled_steps({"no-steps": {}}) == []


def test_rows_measured_before_the_enqueue_time_still_list_their_stalls():
    from bench.train_throughput import stalled_steps

    row = {"step_s": [0.3, 0.3, 0.6], "step_cpu_s": [0.1, 0.1, 0.12], "step_steal_s": [0.0, 0.0, 0.0]}
    (line,) = [x for x in stalled_steps({"old": row}) if x.startswith("- ")]
    assert "step 3: 0.6000 s, enqueued None s, CPU 0.12 s" in line and "(blocking sync)" not in line


def test_each_timed_step_records_its_enqueue_time_and_kernel_counters():
    """The step bench's timing loop (on the CPU): every timed step gets its seconds, when the host
    had enqueued it, its CPU seconds and its getrusage counters; the loss is read after the sync."""
    import time
    from types import SimpleNamespace

    import torch

    from bench.train_throughput import _timed

    def step(i: int):
        time.sleep(0.02 if i == 3 else 0.001)  # one step of the host's own work stands out
        return torch.tensor(float(i))

    row = _timed(step, SimpleNamespace(warmup=1, steps=4, batch=1, seq=8), torch.device("cpu"))
    assert len(row["step_s"]) == len(row["step_enqueued_s"]) == len(row["step_usage"]) == 4
    assert row["step_enqueued_s"][2] >= 0.02 and max(row["step_enqueued_s"]) == row["step_enqueued_s"][2]
    assert set(row["step_usage"][0]) == {"sys_s", "minflt", "majflt", "nivcsw"}
    assert row["blocking_sync"] is False and row["loss_first"] == 0.0 and row["loss_last"] == 4.0
