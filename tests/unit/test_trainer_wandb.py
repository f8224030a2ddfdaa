"""A job with a wandb integration: the trainer writes an offline W&B run of its curves, read back
here with W&B's own reader of run files (what `wandb sync` uploads), and a W&B that cannot start
costs a warning event, never the job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.unit.conftest import chat_rows, write_jsonl
from trainer.events import read_events
from trainer.job import run_job
from trainer.spec import JobSpec
from trainer.tracking import JOB_ID_ENV, WANDB_DIR

STEPS = 4


def read_wandb_run(run_file: Path) -> dict:
    """The run's header (id, project, name, entity, tags, config) and history rows by step, as
    W&B's datastore reader yields the records of a .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    found: dict = {"history": {}, "exit_code": None}
    while (data := store.scan_data()) is not None:
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            found.update(id=r.run_id, project=r.project, name=r.display_name, entity=r.entity, tags=list(r.tags),
                         config={i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            found["history"].setdefault(record.history.step.num, {}).update(row)
        elif kind == "exit":
            found["exit_code"] = record.exit.exit_code
    return found


def spec(tiny_model_dir: Path, train: Path, steps: int = STEPS, **wandb) -> JobSpec:
    return JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(train),
        "hyperparameters": {"max_steps": steps, "batch_size": 4, "max_seq_len": 64, "learning_rate": 1e-2,
                            "warmup_steps": 0},
        "integrations": [{"type": "wandb", "wandb": {"project": "tuneq-tests", **wandb}}],
    })


def test_the_offline_run_holds_the_loss_of_every_step(tiny_model_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(JOB_ID_ENV, "ftjob-wandb1")
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "out"
    assert run_job(spec(tiny_model_dir, train, tags=["nightly"], entity="my-team"), out) == 0

    events = read_events(out / "events.jsonl")
    started = [e for e in events if e["type"] == "integration"]
    assert [e["level"] for e in started] == ["info"], started
    runs = list((out / WANDB_DIR).glob("offline-run-*/run-ftjob-wandb1.wandb"))
    assert len(runs) == 1, list((out / WANDB_DIR).rglob("*"))
    assert started[0]["data"]["path"] == str(runs[0].parent.relative_to(out))

    # Once, under a loaded machine, the run's header record was not in the file read right after the
    # job returned: read again for a while before failing, and say what the file held.
    deadline = time.monotonic() + 10
    while "id" not in (run := read_wandb_run(runs[0])) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "id" in run, f"no run record; exit code {run['exit_code']}, history steps {sorted(run['history'])}"
    assert (run["id"], run["project"], run["name"], run["entity"]) == ("ftjob-wandb1", "tuneq-tests", "ftjob-wandb1",
                                                                       "my-team")
    assert run["tags"] == ["tuneq/finetune", "tuneq/ftjob-wandb1", "nightly"]
    assert run["config"]["hyperparameters"]["max_steps"] == STEPS and run["config"]["job_id"] == "ftjob-wandb1"
    assert run["exit_code"] == 0
    # Every step's loss, as the trainer reported it in its metrics events.
    losses = {e["data"]["step"]: e["data"]["train_loss"] for e in events if e["type"] == "metrics"}
    assert sorted(losses) == list(range(1, STEPS + 1))
    logged = {step: row["train/loss"] for step, row in run["history"].items() if "train/loss" in row}
    assert logged == pytest.approx(losses)
    assert all("train/learning_rate" in run["history"][step] for step in losses)


def test_a_wandb_run_that_cannot_start_costs_a_warning_not_the_job(tiny_model_dir, tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    out = tmp_path / "out"
    out.mkdir()
    (out / WANDB_DIR).write_text("a file where W&B's run directory would go")
    assert run_job(spec(tiny_model_dir, train, steps=1, name="blocked"), out) == 0

    events = read_events(out / "events.jsonl")
    warned = [e for e in events if e["type"] == "integration"]
    assert [(e["level"], e["data"]["code"]) for e in warned] == [("warning", "integration_unavailable")], warned
    assert "training goes on without it" in warned[0]["message"]
    assert any(e["type"] == "finished" for e in events)
