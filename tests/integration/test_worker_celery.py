"""A real `celery -A worker.app worker` process, fed through core.queue like the API feeds it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import states
from core.jobs import request_cancel
from core.models import Job
from core.jobs import acquire_lease
from core.queue import REAP, enqueue_job, producer
from core.settings import get_settings
from tests.integration.conftest import (
    events_of, job_status, make_job, process_alive, trainer_pid, trainer_processes, wait_for,
)
from tests.integration.test_worker_reaper import queued_job_ids

LONG = 100_000  # steps; a metrics event every 2 of them, so waiting for the first takes 2 paced steps


def work_dir(job_id: str) -> Path:
    return get_settings().resolved_work_dir() / job_id


def test_enqueued_job_runs_once_to_succeeded_under_accelerate_and_the_reap_task_requeues_a_dead_workers_job(
    db: Session, worker_env: dict[str, str], celery_worker
) -> None:
    """One worker of two slots serves both: a job delivered twice runs once, and a job whose
    worker died (its lease stale) is re-queued by the reap task and finished here."""
    job = make_job(db, worker_env["model"], steps=4, checkpoint_every=2)
    orphan = make_job(db, worker_env["model"], steps=4)
    assert acquire_lease(db, orphan.id, "dead-worker", ttl_s=30) is not None
    db.execute(update(Job).where(Job.id == orphan.id).values(lease_heartbeat_at=time.time() - 3600))
    db.commit()
    # A short TTL: a worker's reaper judges leases only once it has seen the database up for one
    # (worker.reaper), and this worker has just started.
    worker = celery_worker(slots=2, TUNEQ_ACCELERATE_LAUNCH="true", TUNEQ_LEASE_TTL_S="3", TUNEQ_HEARTBEAT_S="0.5")
    started = time.monotonic()
    enqueue_job(job.id)
    enqueue_job(job.id)  # the same message twice, as a broker re-delivery would

    wait_for(lambda: job_status(job.id) in states.TERMINAL, 120, f"the job to end\n{worker.log()}")
    assert job_status(job.id) == states.SUCCEEDED, worker.log()
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.lease_attempt == 1 and job.fine_tuned_model
    assert len([e for e in events_of(job.id, "message") if e.data and "pid" in e.data]) == 1
    wait_for(lambda: "dropping this duplicate delivery" in worker.log() or "nothing to run" in worker.log(),
             30, "the second delivery to drop out")
    assert trainer_processes(work_dir(job.id)) == []

    time.sleep(max(0.0, 3 - (time.monotonic() - started)))
    producer().send_task(REAP)
    wait_for(lambda: job_status(orphan.id) in states.TERMINAL, 90, f"the reaped job to end\n{worker.log()}")
    assert job_status(orphan.id) == states.SUCCEEDED
    db.expire_all()
    assert db.get(Job, orphan.id).lease_attempt == 2


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancel_of_a_running_job_ends_cancelled_with_the_trainer_gone(
    db: Session, worker_env: dict[str, str], celery_worker
) -> None:
    job = make_job(db, worker_env["model"], steps=LONG, examples=64, log_every=2)
    worker = celery_worker(slots=1, TUNEQ_ACCELERATE_LAUNCH="true")
    enqueue_job(job.id)
    wait_for(lambda: events_of(job.id, "metrics"), 90, f"training to start\n{worker.log()}")
    pid = trainer_pid(job.id)
    # One GPU: the trainer alone, with no `accelerate launch` above it (one interpreter start fewer).
    assert len(trainer_processes(work_dir(job.id))) == 1

    db.expire_all()
    request_cancel(db, db.get(Job, job.id))
    db.commit()
    wait_for(lambda: job_status(job.id) == states.CANCELLED, 30, f"the job to be cancelled\n{worker.log()}")
    assert not process_alive(pid) and trainer_processes(work_dir(job.id)) == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_warm_shutdown_stops_the_trainer_and_requeues_the_job(
    db: Session, worker_env: dict[str, str], celery_worker
) -> None:
    job = make_job(db, worker_env["model"], steps=LONG, examples=64, log_every=2)
    worker = celery_worker(slots=1, TUNEQ_ACCELERATE_LAUNCH="false")
    enqueue_job(job.id)
    wait_for(lambda: events_of(job.id, "metrics"), 90, f"training to start\n{worker.log()}")
    pid = trainer_pid(job.id)

    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(60)
    assert job_status(job.id) == states.QUEUED, worker.log()
    assert not process_alive(pid) and trainer_processes(work_dir(job.id)) == []
    # Back in the queue with a message; the test's own enqueue may still wait there too, as the
    # worker's dispatcher had already sent the job (queued when the worker started) one.
    assert set(queued_job_ids(worker_env["TUNEQ_REDIS_URL"])) == {job.id}
    assert events_of(job.id, "checkpoint"), "the trainer should checkpoint before it stops"
