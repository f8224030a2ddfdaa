"""The step trace on a CUDA device: every step gets its GPU time and the idle gap before it from
the device's own clock, and the allocators' driver calls are counted.

Marked `gpu`: `make test` deselects them (CI has no GPU). The CPU side of the trace (rows, host
regions, the collector, stacks) is in tests/unit/test_step_trace.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _traced_rows(tiny_model_dir: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    """Six steps of a tiny LoRA job, traced: (header, rows)."""
    from trainer.job import run_job
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(data),
        "hyperparameters": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0},
        "schedule": {"log_every_steps": 1},
    })
    assert run_job(spec, tmp_path / "run") == 0
    trace = next((tmp_path / "trace").glob("steps-*.jsonl"))
    header, *rows = [json.loads(x) for x in trace.read_text().splitlines()]
    return header, rows


def test_a_traced_gpu_run_times_every_step_on_the_device(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import profiling

    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path / "trace"))
    torch.cuda.empty_cache()  # the allocator gives back what earlier tests left it: step 1 must allocate
    header, rows = _traced_rows(tiny_model_dir, tmp_path)
    assert "gpu_columns" not in header
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["gpu_gap_s"] is None  # nothing ran before the first step
    for r in rows:
        assert r["gpu_s"] > 0
        assert all(isinstance(r[k], int) and r[k] >= 0 for k in ("device_allocs", "device_frees", "host_allocs"))
    assert all(r["gpu_gap_s"] >= 0 for r in rows[1:])
    # The first step allocates the model's working memory; later ones reuse the cache.
    assert rows[0]["device_allocs"] > 0
    assert not any("held_ms" in r for r in rows)


def test_held_steps_are_queued_while_the_gpu_sleeps(tiny_model_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The sleep comes before a held step, in its GPU gap and not in its GPU time, and the host
    begins queueing it while the GPU sleeps: the lead it gains over the step is at least about
    zero (it cannot lose the lead it had) and at most the sleep and the step. The steps around it
    are not held."""
    from trainer import profiling

    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path / "trace"))
    monkeypatch.setenv(profiling.HOLD_ENV, "3:5")
    _, rows = _traced_rows(tiny_model_dir, tmp_path)
    held = {r["step"]: r for r in rows if r.get("held_ms")}
    assert sorted(held) == [3, 4]
    normal = max(r["gpu_s"] for r in rows if not r.get("held_ms"))
    for r in held.values():
        assert r["gpu_gap_s"] > profiling.HOLD_MS / 1000 * 0.8  # the sleep ran between the steps
        assert r["gpu_s"] < profiling.HOLD_MS / 1000 / 2 and r["gpu_s"] < 5 * normal
        gained = r["gpu_gap_s"] + r["gpu_s"] - r["queue_s"]
        assert -0.005 <= gained <= r["gpu_gap_s"] + r["gpu_s"]
