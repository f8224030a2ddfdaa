"""The step trace (TUNEQ_STEP_TRACE_DIR): one line per step of a real run, with the collector's passes.

On a CPU there are no device events, so the GPU columns are absent; the host's columns and the
collector's passes are what these tests can check. The GPU columns are read by
bench/service_throughput.py --trace on the lent GPU.
"""

from __future__ import annotations

import gc
import json

import torch

from trainer import profiling
from trainer.job import run_job


def test_a_traced_run_writes_a_header_and_every_step(make_spec, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path / "trace"))
    spec = make_spec("lora", hyperparameters={"max_steps": 6}, schedule={"eval_every_steps": 3})
    assert run_job(spec, tmp_path / "run") == 0
    files = list((tmp_path / "trace").glob("steps-*-rank0.jsonl"))
    assert len(files) == 1
    header, *rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert header["method"] == "lora" and header["total_steps"] == 6 and header["out"] == str(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["queue_s"] > 0 and r["read_s"] >= 0 and isinstance(r["gc"], list)
        # The loop's regions are timed while a trace is open; those of the queueing (all_reduce
        # runs inside forward_backward) add up to no more than the step's queueing.
        assert {"collate", "forward_backward", "all_reduce", "optimizer", "log"} <= set(r["host_s"])
        assert r["host_s"]["all_reduce"] <= r["host_s"]["forward_backward"]
        assert sum(v for k, v in r["host_s"].items() if k not in ("log", "all_reduce")) <= r["queue_s"]
        assert "gpu_s" not in r  # no device events on a CPU
        # The main thread's CPU time while queueing: at most the wall time (one thread), and most of
        # it on an idle host (the queueing computes the step here).
        assert 0 < r["queue_cpu_s"] <= r["queue_s"] + 1e-3
        assert "held_ms" not in r


def test_off_the_cpu_time_is_wall_time_less_cpu_time(tmp_path) -> None:
    import time

    trace = profiling.StepTrace(tmp_path, 0, torch.device("cpu"), {})
    trace.begin(1)
    time.sleep(0.2)  # off the CPU: a blocking call
    trace.queued(1)
    trace.read()
    trace.close()
    row = trace.steps[0]
    assert row["queue_s"] >= 0.2 and row["queue_cpu_s"] < 0.1


def test_an_untraced_run_writes_nothing(make_spec, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(profiling.TRACE_ENV, raising=False)
    assert profiling.step_trace(0, torch.device("cpu"), {}) is profiling.NO_TRACE
    assert run_job(make_spec("lora", hyperparameters={"max_steps": 2}), tmp_path / "run") == 0
    assert not list(tmp_path.rglob("steps-*.jsonl"))


def test_a_collection_inside_a_step_is_counted_against_it(tmp_path) -> None:
    trace = profiling.StepTrace(tmp_path, 0, torch.device("cpu"), {})
    try:
        trace.begin(1)
        trace.queued(1)
        trace.read()
        trace.begin(2)
        gc.collect(1)
        trace.queued(2)
        trace.read()
    finally:
        trace.close()
    _, one, two = [json.loads(line) for line in next(tmp_path.glob("steps-*.jsonl")).read_text().splitlines()]
    assert one["gc"] == [] and [g for g, _ in two["gc"]] == [1]
    assert trace._collected not in gc.callbacks  # closed: the collector no longer calls it


def test_regions_are_timed_only_while_a_trace_is_open(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path))
    trace = profiling.step_trace(0, torch.device("cpu"), {})
    trace.begin(1)
    with profiling.region("collate"):
        pass
    trace.queued(1)
    trace.read()
    trace.close()
    assert set(trace.steps[0]["host_s"]) == {"collate"}
    assert profiling.region("collate") is profiling._OFF  # closed: back to nothing


def test_stack_samples_name_what_the_host_was_doing(make_spec, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path / "trace"))
    monkeypatch.setenv(profiling.STACKS_ENV, "1")
    assert run_job(make_spec("lora", hyperparameters={"max_steps": 4}), tmp_path / "run") == 0
    _, *rows = [json.loads(x) for x in next((tmp_path / "trace").glob("steps-*.jsonl")).read_text().splitlines()]
    samples = [where for r in rows for where, _ in r.get("stacks", [])]
    assert any(where.startswith("[MainThread] ") for where in samples)
    # The main thread spends its steps in the model's forward and backward, whose frames are torch's.
    assert sum(n for r in rows for where, n in r.get("stacks", []) if ".py:" in where) >= 4
    assert not any(t.name == "tuneq-step-stacks" for t in __import__("threading").enumerate())
