"""A DPO job through the official openai SDK on the real stack: created in OpenAI's shape, polled
to success, its events read (with the preference metrics), its adapter downloaded and loaded."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import openai
import pytest
import torch

from tests.e2e.conftest import Stack, dump_logs
from tests.unit.test_preference import pairs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_dpo_through_the_openai_sdk(stack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    lines = "".join(json.dumps(p) + "\n" for p in pairs(48, 1)).encode()
    train = sdk.files.create(file=("prefs.jsonl", lines), purpose="fine-tune")
    valid = sdk.files.create(file=("valid.jsonl", "".join(json.dumps(p) + "\n" for p in pairs(16, 2)).encode()),
                             purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train.id, validation_file=valid.id, seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8, "n_epochs": 2,
                                                           "learning_rate_multiplier": 100}}},
        extra_body={"schedule": {"log_every_steps": 2}},
    )
    deadline = time.monotonic() + 600
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        job = sdk.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", f"{job}\n{dump_logs(stack)}"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics and {"train_loss", "train_chosen_reward", "train_rejected_reward", "train_reward_margin",
                        "train_preference_accuracy"} <= set(metrics[0])
    validation = [e.data for e in events if e.kind == "validation"]
    assert validation[-1]["full_valid_preference_accuracy"] > 0.9, validation
    assert job.metrics["full_valid_preference_accuracy"] > 0.9

    with stack.client() as c:
        arts = {a["name"]: a for a in c.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts").json()["data"]}
        data = c.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/{arts['adapter.tar.gz']['id']}/content").content
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert any("lora_" in n for n, _ in tuned.named_parameters())
