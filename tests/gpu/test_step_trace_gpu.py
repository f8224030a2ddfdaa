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


def test_a_traced_gpu_run_times_every_step_on_the_device(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import profiling
    from trainer.job import run_job
    from trainer.spec import JobSpec

    monkeypatch.setenv(profiling.TRACE_ENV, str(tmp_path / "trace"))
    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(data),
        "hyperparameters": {"max_steps": 6, "batch_size": 4, "learning_rate": 3e-3, "warmup_steps": 0},
        "schedule": {"log_every_steps": 1},
    })
    assert run_job(spec, tmp_path / "run") == 0
    header, *rows = [json.loads(x) for x in next((tmp_path / "trace").glob("steps-*.jsonl")).read_text().splitlines()]
    assert "gpu_columns" not in header
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["gpu_gap_s"] is None  # nothing ran before the first step
    for r in rows:
        assert r["gpu_s"] > 0
        assert all(isinstance(r[k], int) and r[k] >= 0 for k in ("device_allocs", "device_frees", "host_allocs"))
    assert all(r["gpu_gap_s"] >= 0 for r in rows[1:])
    # The first step allocates the model's working memory; later ones reuse the cache.
    assert rows[0]["device_allocs"] > 0
