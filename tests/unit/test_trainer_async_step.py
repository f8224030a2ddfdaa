"""The training loop never waits for the device mid-run: a step's values are read one step late.

On a GPU, reading a tensor's value (`.tolist()`, `.item()`, `float()`, `int()`, `bool()`) makes
the host wait for every kernel queued before it. These tests run the real loop on the CPU and
record, in order, when each step is queued and when its values are read, and every value read
that the trainer's own code makes of a floating tensor (the device-computed kind: losses, sums,
norms; the batch's token counts are integer tensors built on the host). They fail if a per-step
value is read before the next step is queued, or if a read bypasses the one late read.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import trainer
import trainer.loop
from trainer import step_values
from trainer.events import read_events
from trainer.job import run_job

TRAINER_DIR = str(Path(trainer.__file__).parent)
LATE_READ_FILE = step_values.__file__
READS = ("tolist", "item", "__float__", "__int__", "__bool__")


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Order of ("queue", n), ("queued", n), ("read", n) and ("sync", file:line) during train()."""
    entries: list[tuple] = []
    queued = {"n": 0}

    queue = trainer.loop.queue_forward_backward

    def queue_step(*args, **kwargs):
        queued["n"] += 1
        entries.append(("queue", queued["n"]))
        return queue(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "queue_forward_backward", queue_step)

    class RecordedLateRead(step_values.LateRead):
        # Created once the step's optimizer update is queued; it is the step's only way to the host.
        def __init__(self, values: torch.Tensor) -> None:
            super().__init__(values)
            self.step = queued["n"]
            entries.append(("queued", self.step))

        def read(self) -> list[float]:
            entries.append(("read", self.step))
            return super().read()

    monkeypatch.setattr(trainer.loop, "LateRead", RecordedLateRead)

    for name in READS:
        original = getattr(torch.Tensor, name)

        def reading(self, *args, __original=original, __name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # The trainer's own reads of a computed (floating) value; LateRead's is the allowed one.
            if self.is_floating_point() and caller.startswith(TRAINER_DIR) and caller != LATE_READ_FILE:
                frame = sys._getframe(1)
                entries.append(("sync", f"{Path(caller).name}:{frame.f_lineno} {__name}"))
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    return entries


def test_a_step_is_read_only_after_the_next_one_is_queued(make_spec, tmp_path, log):
    steps = 6
    spec = make_spec("lora", hyperparameters={"max_steps": steps, "batch_size": 2, "max_seq_len": 32,
                                              "gradient_accumulation_steps": 2, "warmup_steps": 0})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0

    # No value computed in a step is read by the loop except through the late read.
    assert [e for e in log if e[0] == "sync"] == []
    order = {e: i for i, e in enumerate(log)}
    assert [e[1] for e in log if e[0] == "queued"] == list(range(1, steps + 1))
    assert [e[1] for e in log if e[0] == "read"] == list(range(1, steps + 1))  # each once, in order
    for n in range(1, steps):
        # Step n's values are read only once step n+1 is wholly queued (forward, backward, update).
        assert order[("read", n)] > order[("queued", n + 1)], (n, log)
    # The last step has no successor: it is drained before the end.
    assert order[("read", steps)] > order[("queued", steps)]

    metrics = [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(m["grad_norm"] > 0 and m["train_loss"] > 0 for m in metrics)


def test_every_step_is_logged_once_in_order_before_what_follows_it(make_spec, chat_files, tmp_path):
    steps = 7
    spec = make_spec("lora", validation_file=str(chat_files["valid"]),
                     hyperparameters={"max_steps": steps, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0},
                     schedule={"checkpoint_every_steps": 3, "eval_every_steps": 2, "keep_checkpoints": 5})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    events = read_events(out / "events.jsonl")
    kinds = [(e["type"], e["data"].get("step")) for e in events
             if e["type"] in ("metrics", "validation", "checkpoint", "finished")]
    # Validation and checkpoints at exactly their steps, each after its step's metrics and
    # before the next step's; the last step's metrics before the final validation and the end.
    assert kinds == [
        ("metrics", 1), ("metrics", 2), ("validation", 2), ("metrics", 3), ("checkpoint", 3),
        ("metrics", 4), ("validation", 4), ("metrics", 5), ("metrics", 6), ("validation", 6), ("checkpoint", 6),
        ("metrics", 7), ("validation", 7), ("finished", 7),
    ]
    metrics = {e["data"]["step"]: e["data"] for e in events if e["type"] == "metrics"}
    for event in (e for e in events if e["type"] == "checkpoint"):
        step = event["data"]["step"]
        # The checkpoint holds the metrics and the token counts of the step it saved.
        assert event["data"]["metrics"]["step"] == step
        assert event["data"]["metrics"]["train_loss"] == metrics[step]["train_loss"]
        meta = json.loads((out / event["data"]["path"] / "state.json").read_text())
        assert meta["train_state"]["step"] == step
        assert meta["train_state"]["seen_tokens"] == metrics[step]["tokens"]


def test_profile_steps_write_tables_per_rank(make_spec, tmp_path, monkeypatch):
    from trainer import profiling

    assert profiling.parse_steps("") is None and profiling.parse_steps("3:3") is None
    assert profiling.parse_steps("2:4") == (2, 4)
    monkeypatch.setenv(profiling.STEPS_ENV, "2:4")
    monkeypatch.setenv(profiling.DIR_ENV, str(tmp_path / "prof"))
    spec = make_spec("lora", hyperparameters={"max_steps": 5, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0})
    assert run_job(spec, tmp_path / "run") == 0
    text = (tmp_path / "prof" / "profile-rank0.txt").read_text()
    assert "step 2:" in text and "step 3:" in text and "step 4:" not in text
    assert "by self CPU time" in text and "forward_backward" in text and "optimizer" in text
    # The timeline too, with the loop's regions in it (bench/launch_lead.py splits steps by them).
    import gzip

    timeline = json.loads(gzip.decompress((tmp_path / "prof" / "profile-rank0.json.gz").read_bytes()))
    names = {e.get("name") for e in timeline["traceEvents"]}
    assert {"forward_backward", "optimizer"} <= names
    assert not (tmp_path / "prof" / "profile-rank0.json").exists()


def test_tokens_per_second_times_each_step_by_when_its_work_ended(make_spec, tmp_path, monkeypatch):
    """Read one step late, the last step is read right after the one before it; its tokens/s must
    still come from when its work ended (on a CPU: when it was queued), not from the read. Each
    step is made to take 50 ms more, so every step's rate is at most tokens / 0.05 s."""
    import trainer.loop

    queue = trainer.loop.queue_forward_backward

    def slow_step(*args, **kwargs):
        time.sleep(0.05)
        return queue(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "queue_forward_backward", slow_step)
    spec = make_spec("lora", hyperparameters={"max_steps": 6, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0})
    out = tmp_path / "run"
    assert run_job(spec, out) == 0
    metrics = [e["data"] for e in read_events(out / "events.jsonl") if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    tokens = [b["tokens"] - a["tokens"] for a, b in zip(metrics, metrics[1:])]
    for m, n in zip(metrics[1:], tokens):
        assert m["tokens_per_second"] <= n / 0.05, (m["step"], m["tokens_per_second"], n)
