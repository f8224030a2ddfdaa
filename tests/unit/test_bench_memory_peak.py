"""bench.memory_peak replays an allocator trace to its highest point."""

from __future__ import annotations

from pathlib import Path

from bench.memory_peak import GiB, summarize

ROOT = Path(__file__).resolve().parents[2]


def _frame(name: str) -> list[dict]:
    return [{"filename": "/x/site-packages/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
            {"filename": str(ROOT / "trainer" / "loss_heads.py"), "line": 7, "name": name}]


def test_the_peak_is_the_highest_point_and_names_who_holds_it():
    trace = [
        {"action": "alloc", "addr": 1, "size": GiB, "frames": _frame("logits")},
        {"action": "alloc", "addr": 2, "size": GiB // 2, "frames": _frame("grad")},
        {"action": "free_completed", "addr": 1, "size": GiB, "frames": []},
        {"action": "free_completed", "addr": 99, "size": GiB // 4, "frames": []},  # held from before the step
        {"action": "alloc", "addr": 3, "size": GiB // 4, "frames": _frame("late")},
    ]
    text = summarize(trace, baseline=2 * GiB, title="t")
    assert "Peak allocated in the recorded step: 3.500 GiB = 2.000 GiB held before" in text
    assert "| 1.000 | 1 | trainer/loss_heads.py:7 logits |" in text
    assert "late" not in text  # allocated after the peak
