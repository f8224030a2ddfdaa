"""Two hosts of different GPU sizes on this machine: CPU workers that report 16 and 80 GiB GPUs
(TUNEQ_GPU_MEMORY_GIB). A job lands only on GPUs its plan fits; one that runs out of memory on
the smaller host moves to the larger; with no larger host left, the out-of-memory is the user's."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from core import states, workers as registry
from core.jobs import request_cancel
from core.models import Job
from core.queue import enqueue_job
from tests.reliability.conftest import IDLE_STEPS, STEADY_LEASE, events_of, job_status, make_job, trainer_starts, wait_for
from trainer.job import TEST_OOM_ENV

LONG = 100_000  # steps: the job ends by cancel


def host(workers, tmp_path: Path, name: str, memory_gib: float, **extra: str):  # noqa: ANN001, ANN201
    root = tmp_path / name
    return workers(TUNEQ_HOST_ID=name, TUNEQ_WORK_DIR=str(root / "work"), TUNEQ_GPU_LOCK_DIR=str(root / "locks"),
                   TUNEQ_GPU_MEMORY_GIB=str(memory_gib), **STEADY_LEASE, **IDLE_STEPS, **extra)


def queued(db: Session, env: dict[str, str], min_gpu_memory_gib: float | None = None, **kw) -> Job:  # noqa: ANN003
    job = make_job(db, env["model"], **kw)
    job.min_gpu_memory_gib = min_gpu_memory_gib  # as admission stores it from the job's plan
    db.commit()
    enqueue_job(job.id)
    return job


def hosts_run_on(job_id: str) -> list[str]:
    return [e.data["host"] for e in trainer_starts(job_id)]


def test_jobs_run_only_on_gpus_they_fit_and_move_up_after_running_out_of_memory(
        db: Session, rel_env: dict[str, str], workers, tmp_path: Path) -> None:  # noqa: ANN001
    # Every trainer on the small host runs out of memory, as a job too big for its GPUs would.
    small = host(workers, tmp_path, "small", 16, **{TEST_OOM_ENV: "1"})
    large = host(workers, tmp_path, "large", 80)
    logs = lambda: small.log() + large.log()  # noqa: E731

    # Its plan needs 40 GiB: only the large host may run it, though the small one is free.
    big = queued(db, rel_env, 40.0, steps=LONG)
    wait_for(lambda: job_status(big.id) == states.RUNNING and trainer_starts(big.id), 90, logs)
    assert hosts_run_on(big.id) == ["large"]
    db.expire_all()
    assert db.get(Job, big.id).gpu == {"name": "simulated", "memory_gib": 80.0, "count": 1}

    # Fits both; only the small host is free, so it starts there, runs out of memory, and waits
    # for GPUs larger than 16 GiB instead of failing.
    moved = queued(db, rel_env, steps=4)
    wait_for(lambda: any("re-queued for GPUs of 80 GiB" in e.message for e in events_of(moved.id)), 90, logs)
    wait_for(lambda: job_status(moved.id) == states.QUEUED, 30, logs)
    db.expire_all()
    assert db.get(Job, moved.id).min_gpu_memory_gib == 80.0
    request_cancel(db, db.get(Job, big.id))  # frees the large host
    db.commit()
    wait_for(lambda: job_status(moved.id) in states.TERMINAL, 120, logs)
    db.expire_all()
    done = db.get(Job, moved.id)
    assert done.status == states.SUCCEEDED, (done.error, logs())
    assert hosts_run_on(moved.id) == ["small", "large"]
    assert done.host == "large" and done.gpu["memory_gib"] == 80.0
    assert events_of(moved.id, "retry") == []  # a move, not an infrastructure retry used up

    # With no larger host registered, running out of memory is the user's error.
    large.stop()
    wait_for(lambda: all(h["host"] != "large" for h in registry.hosts()), 30, "the large host to leave")
    failed = queued(db, rel_env, steps=4)
    wait_for(lambda: job_status(failed.id) in states.TERMINAL, 90, logs)
    db.expire_all()
    job = db.get(Job, failed.id)
    assert job.status == states.FAILED and job.error["code"] == "oom", job.error
    assert "no registered host has larger GPUs" in job.error["message"]
    assert hosts_run_on(failed.id) == ["small"]
