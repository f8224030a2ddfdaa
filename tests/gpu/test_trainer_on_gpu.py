"""The trainer on a CUDA GPU: bf16, fused AdamW, 4-bit loading, peak memory in the events.

Marked `gpu`: `make test` deselects them (CI has no GPU); they run on the lent H200 with
`python3 -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

# A marker, not a module-level skip: `make test` deselects -m gpu, and a skip raised while
# collecting would still count as a skipped test, which CI=true forbids.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(tiny_model_dir: Path, tmp_path: Path, method: str, lr: float) -> list[dict]:
    from trainer.job import run_job
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    body = {"model": str(tiny_model_dir), "method": method, "training_file": str(data),
            "hyperparameters": {"n_epochs": 5, "batch_size": 8, "learning_rate": lr}}
    if method != "full":
        body["lora"] = {"r": 16, "alpha": 64}
    out = tmp_path / method
    assert run_job(JobSpec.model_validate(body), out) == 0
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("method", "lr"), [("lora", 3e-3), ("qlora", 3e-3), ("full", 1e-3)])
def test_method_trains_in_bf16_and_reports_peak_memory(tiny_model_dir: Path, tmp_path: Path, method: str, lr: float):
    events = _run(tiny_model_dir, tmp_path, method, lr)
    start = next(e["data"] for e in events if e["type"] == "start")
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert start["precision"] == "bf16"
    assert all(m["peak_memory_bytes"] and m["peak_memory_bytes"] > 0 for m in metrics)
    losses = [m["train_loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert any(e["type"] == "finished" for e in events)
