"""schedule.checkpoint_every_minutes: a checkpoint by the clock as well as by the step count."""

from __future__ import annotations

from trainer.events import read_events
from trainer.job import run_job


def test_checkpoints_by_time_keep_the_newest(make_spec, tmp_path):
    # A period shorter than one step: every step votes for a checkpoint, so a job without a step
    # period still checkpoints, and keep_checkpoints prunes by age. A step's votes are read once
    # the next step is queued (the host never waits for the GPU mid-run), and the checkpoint is
    # then taken after that next step: step 1's vote saves step 2, whose own vote is spent by it.
    spec = make_spec("lora", schedule={"checkpoint_every_minutes": 1e-6, "keep_checkpoints": 2},
                     hyperparameters={"max_steps": 6, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    events = read_events(out / "events.jsonl")
    steps = [e["data"]["step"] for e in events if e["type"] == "checkpoint"]
    assert steps == [2, 4, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    # Each checkpoint holds the step it saved and follows that step's metrics.
    kinds = [(e["type"], e["data"]["step"]) for e in events if e["type"] in ("metrics", "checkpoint")]
    for step in steps:
        assert kinds.index(("metrics", step)) < kinds.index(("checkpoint", step))
    assert all(e["data"]["metrics"]["step"] == e["data"]["step"] for e in events if e["type"] == "checkpoint")


def test_no_time_checkpoints_without_the_setting(make_spec, tmp_path):
    spec = make_spec("lora", hyperparameters={"max_steps": 3, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    assert not [e for e in read_events(out / "events.jsonl") if e["type"] == "checkpoint"]
