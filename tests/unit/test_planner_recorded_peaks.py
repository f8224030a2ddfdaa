"""The planner against every peak memory recorded on a GPU in bench/results (bench/plan_accuracy.py
--recorded): the trainer as it is now is planned within ±10 % of each, offload, optimizer in
backward and batch 8 included."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_recorded_peak_of_the_current_trainer_is_planned_within_ten_percent() -> None:
    spec = importlib.util.spec_from_file_location("plan_accuracy", ROOT / "bench" / "plan_accuracy.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [(r, err) for r, _, err, stale in bench.recorded_errors(ROOT / "bench" / "results") if not stale]
    settings = {(r["spec"]["method"], r["spec"]["speed"], bool(r["spec"].get("checkpoint_offload")),
                 bool(r["spec"].get("optimizer_in_backward"))) for r, _ in rows}
    # The settings the planner must cover are all there: offload and optimizer in backward too.
    assert {("lora", "lean", True, False), ("lora", "fast", False, False), ("qlora", "lean", True, False),
            ("full", "lean", False, True), ("full", "lean", True, True), ("full", "balanced", False, False)} <= settings
    assert any(r["spec"]["hyperparameters"]["batch_size"] > 4 for r, _ in rows)
    off = [(r["source"], r["row"], round(err, 1)) for r, err in rows if abs(err) > 10]
    assert not off, off
