"""bench.service_throughput fits the planner's start-up to the runs on record, by medians."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.service_throughput import fit_startup, startup_runs

H100 = "NVIDIA H100 80GB HBM3"


def _fresh(load: float, rest: float) -> dict:
    phases = {"queue": 9.0, "import": rest / 2, "data": rest / 2, "load": load}  # queue: not the trainer's
    return {"name": "job-lora-fast-default", "ok": True, "setting": "lora-fast", "startup": {"phases": phases}}


def _served(load: float, first_step_after: float, warm: bool = True) -> dict:
    detail = {"forked": True} if warm else {"forked": False, "standby": False}
    return {"name": "service-default", "ok": True, "setting": "service", "ready_s": 20.0,
            "submit_to_first_step_s": load + first_step_after, "startup": {"phases": {"load": load}, "detail": detail}}


def _run(device: str, jobs: list[dict], served: list[dict]) -> dict:
    return {"device": device, "settings": {"lora-fast": {"jobs": jobs}}, "service": served}


def test_medians_over_every_run_keep_a_cold_first_job_from_moving_the_fit():
    runs = [("a", _run(H100, [_fresh(3.0, 12.0)], [_served(6.0, 7.0), _served(3.0, 1.5), _served(3.0, 1.7)])),
            ("b", _run(H100, [_fresh(3.0, 13.0), _fresh(9.0, 20.0)], [_served(3.0, 1.6), _served(3.0, 1.9, warm=False)]))]
    entry = fit_startup(runs, {"fixed_s": 99.0, "other": "kept"}, "2026-01-01")
    assert entry["fixed_s"] == pytest.approx(13.0)  # median of 12, 13 and 20; the queue is not counted
    assert entry["warm_fixed_s"] == pytest.approx(1.65)  # of 7.0, 1.5, 1.7, 1.6: a fresh service job is left out
    assert entry["load_s_per_gib"] == pytest.approx(3.0 / entry["weights_gib"], abs=0.01)
    assert entry["other"] == "kept" and "bench/results/a.md, bench/results/b.md" in entry["source"]


def test_only_runs_of_that_gpu_model_whose_stack_was_waited_ready_are_pooled(tmp_path: Path):
    ready = _run(H100, [_fresh(3.0, 12.0)], [_served(3.0, 1.5)])
    older = _run(H100, [_fresh(3.0, 12.0)], [_served(3.0, 20.0)])
    del older["service"][0]["ready_s"]  # from before the bench waited for a ready stack
    (tmp_path / "service_throughput_h100_x.json").write_text(json.dumps(ready))
    (tmp_path / "service_throughput_h100_old.json").write_text(json.dumps(older))
    (tmp_path / "service_throughput_h200.json").write_text(json.dumps(_run("NVIDIA H200", [], [_served(3.0, 1.5)])))
    sampled = _run(H100, [_fresh(3.0, 12.0)], [_served(3.0, 1.5)])
    sampled["args"] = {"trace_stacks_ms": 5}  # its trainers sampled their own stacks
    (tmp_path / "service_throughput_h100_stacks.json").write_text(json.dumps(sampled))
    own = ("service_throughput_h100_new", _run(H100, [], []))
    assert [name for name, _ in startup_runs(H100, own, folder=tmp_path)] == [
        "service_throughput_h100_new", "service_throughput_h100_x"]
