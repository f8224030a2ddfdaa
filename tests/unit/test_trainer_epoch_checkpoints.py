"""A checkpoint at the end of every epoch, as OpenAI's jobs have, when the run counts epochs."""

from __future__ import annotations

import pytest

from trainer.events import read_events
from trainer.job import run_job


def checkpoints(out) -> list[tuple[int, float]]:
    return [(e["data"]["step"], e["data"]["epoch"]) for e in read_events(out / "events.jsonl") if e["type"] == "checkpoint"]


def test_a_run_of_epochs_checkpoints_at_each_epochs_end(make_spec, tmp_path) -> None:
    # 48 examples, micro-batches of 10: 5 per epoch; 2 per step, so step 3 ends epoch 1 and step 5 epoch 2.
    spec = make_spec(hyperparameters={"max_steps": None, "n_epochs": 2, "batch_size": 10,
                                      "gradient_accumulation_steps": 2})
    assert run_job(spec, tmp_path / "run") == 0
    assert checkpoints(tmp_path / "run") == [(3, pytest.approx(1.2)), (5, 2.0)]


def test_max_steps_runs_checkpoint_at_epochs_only_when_asked(make_spec, tmp_path) -> None:
    hp = {"max_steps": 7, "batch_size": 16}  # 3 steps per epoch
    assert run_job(make_spec(hyperparameters=hp), tmp_path / "off") == 0
    assert checkpoints(tmp_path / "off") == []
    assert run_job(make_spec(hyperparameters=hp, schedule={"checkpoint_every_epoch": True}), tmp_path / "on") == 0
    assert [step for step, _ in checkpoints(tmp_path / "on")] == [3, 6]
    no = make_spec(hyperparameters={"max_steps": None, "n_epochs": 2, "batch_size": 16},
                   schedule={"checkpoint_every_epoch": False})
    assert run_job(no, tmp_path / "no") == 0
    assert checkpoints(tmp_path / "no") == []
