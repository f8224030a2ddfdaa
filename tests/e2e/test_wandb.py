"""OpenAI's wandb integration on the real stack: a job created through the openai SDK with
`integrations`, trained by a worker, its offline W&B run downloaded as a user does (`tuneq download
--wandb`) and read with W&B's own reader: the loss of every step, under the job's id.

The same job checks that the SDK lists a checkpoint per epoch of a finished job (a second job for
that alone would cost a trainer run)."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import Stack, dump_logs, reverse_dataset
from tests.e2e.test_cli_path import tuneq
from tests.unit.test_trainer_wandb import read_wandb_run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_wandb_integration_yields_an_offline_run_to_sync(stack: Stack, tmp_path: Path) -> None:
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.key, max_retries=0)
    # 12 examples in batches of 4, two epochs: six steps, epochs ending at steps 3 and 6.
    train = sdk.files.create(file=("train.jsonl", reverse_dataset(12, seed=5).encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train.id,
        integrations=[{"type": "wandb", "wandb": {"project": "reverse", "tags": ["e2e"]}}],
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
    )
    assert job.integrations[0].wandb.project == "reverse"
    deadline = time.monotonic() + 600
    while job.status not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(1)
        job = sdk.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", f"{job}\n{dump_logs(stack)}"

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))
    (started,) = [e for e in events if e.kind == "integration"]
    assert started.level == "info" and started.data["run_id"] == job.id
    losses = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics"}
    assert sorted(losses) == list(range(1, 7))
    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    # Newest first, as OpenAI lists them.
    assert [c.step_number for c in checkpoints] == [6, 3]
    assert all(c.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{c.step_number}") for c in checkpoints)

    got = tuneq(stack, tmp_path, "download", job.id, "wb", "--wandb")
    assert got.returncode == 0, got.stderr
    (run_file,) = (tmp_path / "wb").glob(f"offline-run-*/run-{job.id}.wandb")
    run = read_wandb_run(run_file)
    assert (run["id"], run["project"], run["name"]) == (job.id, "reverse", job.id)
    assert run["tags"] == ["tuneq/finetune", f"tuneq/{job.id}", "e2e"]
    logged = {step: row["train/loss"] for step, row in run["history"].items() if "train/loss" in row}
    assert logged == pytest.approx(losses)
    assert run["exit_code"] == 0
