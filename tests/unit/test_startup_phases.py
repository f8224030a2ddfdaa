"""Start-up phases: the trainer's marks, the worker's progress.startup, and `tuneq status`'s row."""

from __future__ import annotations

from pathlib import Path

from core.models import Job
from trainer.startup import Phases, process_started
from tuneq.cli.render import _startup
from worker.events import ProgressTracker


def test_phases_are_the_time_between_marks_in_order(monkeypatch) -> None:
    clock = iter([12.0, 15.5, 16.0])
    monkeypatch.setattr("trainer.startup.time.time", lambda: next(clock))
    phases = Phases(started=10.0)
    for name in ("import", "data", "load"):
        phases.mark(name)
    assert phases.seconds() == {"import": 2.0, "data": 3.5, "load": 0.5}
    assert list(phases.seconds()) == ["import", "data", "load"] and phases.total() == 6.0


def test_this_process_started_before_now() -> None:
    import time

    assert 0 <= time.time() - process_started() < 24 * 3600


def test_the_job_body_gets_queue_launch_and_the_trainers_phases(tmp_path: Path) -> None:
    job = Job(created_at=100.0, started_at=101.5, progress={"step": 1})
    data = {"phases": {"import": 4.0, "data": 1.0, "load": 3.0, "prepare": 0.5, "first_step": 2.0},
            "seconds": 10.5, "process_started": 102.0}
    ProgressTracker(tmp_path)._on_startup(job, data, t=112.5)
    assert job.progress["step"] == 1
    assert job.progress["startup"] == {"queue": 1.5, "launch": 0.5, "import": 4.0, "data": 1.0, "load": 3.0,
                                       "prepare": 0.5, "first_step": 2.0, "total": 12.5}
    row = _startup(job.progress["startup"])
    assert row.startswith("queue 1.5 s, launch 0.5 s, import 4.0 s") and row.endswith("; 12.5 s to the first step")
