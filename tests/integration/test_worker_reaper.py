"""A worker that stops heartbeating loses its job to the queue, and the broker gets it again."""

from __future__ import annotations

import json
import time

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import states
from core.jobs import acquire_lease, request_cancel
from core.models import Job
from tests.integration.conftest import make_job, wait_for
from worker.reaper import DatabaseWatch, ReaperThread, reap_once

# The reaper's stale-lease query compares times in SQL: checked on both databases.
pytestmark = pytest.mark.dialects


def queued_job_ids(redis_url: str) -> list[str]:
    """Job ids of the tuneq.run_job messages waiting in the `tuneq` queue of the real Redis."""
    ids = []
    for raw in redis.Redis.from_url(redis_url).lrange("tuneq", 0, -1):
        msg = json.loads(raw)
        assert msg["headers"]["task"] == "tuneq.run_job"
        ids.append(msg["headers"]["argsrepr"].strip("[]()'\", "))
    return ids


def watched(up_for_s: float = 3600.0) -> DatabaseWatch:
    """A reaper's watch that has seen the database up for `up_for_s` (longer than any TTL here)."""
    watch = DatabaseWatch()
    watch.up_since, watch.last_up = time.monotonic() - up_for_s, time.monotonic()
    return watch


def make_stale(db: Session, job_id: str, age_s: float) -> None:
    db.execute(update(Job).where(Job.id == job_id).values(lease_heartbeat_at=time.time() - age_s))
    db.commit()


def test_stale_lease_is_reaped_and_requeued(db: Session, db_env: dict[str, str]) -> None:
    stale, live = make_job(db), make_job(db)
    for job in (stale, live):
        assert acquire_lease(db, job.id, "dead-worker", ttl_s=30)
    make_stale(db, stale.id, age_s=120)  # TUNEQ_LEASE_TTL_S is 30

    assert reap_once(watched()) == [stale.id]
    db.expire_all()
    assert db.get(Job, stale.id).status == states.QUEUED
    assert db.get(Job, stale.id).lease_owner is None
    assert db.get(Job, live.id).status == states.RUNNING
    assert queued_job_ids(db_env["TUNEQ_REDIS_URL"]) == [stale.id]

    # The next delivery takes the job as a new attempt.
    again = acquire_lease(db, stale.id, "next-worker", ttl_s=30)
    assert again is not None and again.lease_attempt == 2


def test_stale_cancelling_job_ends_cancelled_not_requeued(db: Session, db_env: dict[str, str]) -> None:
    job = make_job(db)
    job = acquire_lease(db, job.id, "dead-worker", ttl_s=30)
    request_cancel(db, job)
    db.commit()
    make_stale(db, job.id, age_s=120)
    assert reap_once(watched()) == []
    db.expire_all()
    assert db.get(Job, job.id).status == states.CANCELLED
    assert queued_job_ids(db_env["TUNEQ_REDIS_URL"]) == []


def test_reaper_thread_requeues_without_being_called(db: Session, db_env: dict[str, str]) -> None:
    job = make_job(db)
    assert acquire_lease(db, job.id, "dead-worker", ttl_s=30)
    make_stale(db, job.id, age_s=120)
    reaper = ReaperThread(interval_s=0.2, watch=watched())
    reaper.start()
    try:
        wait_for(lambda: queued_job_ids(db_env["TUNEQ_REDIS_URL"]) == [job.id], 10, "the reaper thread")
    finally:
        reaper.stop()
        reaper.join(5)
    assert not reaper.is_alive()


def test_a_reaper_that_has_not_watched_the_database_for_a_ttl_reaps_nothing(db: Session, db_env: dict[str, str]) -> None:
    """Just after an outage (or its own start) the reaper cannot tell a dead worker from one that
    could not renew: it waits until it has seen the database up for a TTL (worker.reaper)."""
    job = make_job(db)
    assert acquire_lease(db, job.id, "live-worker", ttl_s=30)
    make_stale(db, job.id, age_s=120)
    assert reap_once(watched(up_for_s=10)) == []  # TUNEQ_LEASE_TTL_S is 30
    assert reap_once(DatabaseWatch()) == []
    db.expire_all()
    assert db.get(Job, job.id).status == states.RUNNING
    assert reap_once(watched(up_for_s=31)) == [job.id]
