"""The Celery app of the worker: thin tasks over plain functions, plus lifecycle hooks.

Start: celery -A worker.app worker -Q tuneq --pool threads --concurrency N   (N = job slots)
   or: python -m worker --slots N
"""

from __future__ import annotations

from typing import Any

from celery import signals

from core.queue import REAP, RUN_JOB, make_celery
from worker import reaper, runner

app = make_celery()

_reaper: reaper.ReaperThread | None = None


@app.task(name=RUN_JOB)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id)


@app.task(name=REAP)
def reap() -> list[str]:
    return reaper.reap_once()


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper
    if _reaper is None:
        _reaper = reaper.ReaperThread()
        _reaper.start()


@signals.worker_shutting_down.connect
def _stop_running_jobs(**_: Any) -> None:
    # Celery then waits for the tasks: each stops its trainer and hands its job back to the queue.
    runner.SHUTDOWN.set()
    if _reaper is not None:
        _reaper.stop()
