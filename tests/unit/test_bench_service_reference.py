"""bench.service_throughput holds a job's median step against the step bench's median step."""

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
