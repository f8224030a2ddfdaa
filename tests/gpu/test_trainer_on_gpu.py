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


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train_on_the_gpu(tiny_model_dir: Path, tmp_path: Path, optimizer: str):
    from trainer.job import run_job
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "full", "training_file": str(data), "optimizer": optimizer,
        "hyperparameters": {"n_epochs": 5, "batch_size": 8, "learning_rate": 1e-3},
    })
    out = tmp_path / optimizer
    assert run_job(spec, out) == 0
    metrics = [json.loads(line)["data"] for line in (out / "events.jsonl").read_text().splitlines()
               if json.loads(line)["type"] == "metrics"]
    losses = [m["train_loss"] for m in metrics]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, (optimizer, losses)


@pytest.mark.parametrize("body", [
    {"method": "qlora", "quantization": {"bits": 8}, "lora": {"r": 16, "alpha": 64}},
    {"method": "lora", "lora": {"r": 16, "alpha": 64, "use_dora": True}},
    {"method": "ia3"},
], ids=["qlora-8bit", "dora", "ia3"])
def test_other_methods_train_on_the_gpu(tiny_model_dir: Path, tmp_path: Path, body: dict):
    from trainer.job import run_job
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    lr = 3e-2 if body["method"] == "ia3" else 3e-3
    spec = JobSpec.model_validate({"model": str(tiny_model_dir), "training_file": str(data),
                                   "hyperparameters": {"n_epochs": 5, "batch_size": 8, "learning_rate": lr}, **body})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    losses = [e["data"]["train_loss"] for e in events if e["type"] == "metrics"]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, (body, losses)
