"""The database decides who runs a job: one conditional UPDATE, one winner, on both databases."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
from sqlalchemy.orm import Session

from core import states
from core.db import make_engine
from core.jobs import acquire_lease, heartbeat, lock_leased_job
from core.models import Job
from tests.integration.conftest import make_job

# The lease is one conditional UPDATE: its race must have one winner on both databases.
pytestmark = pytest.mark.dialects

CONTENDERS = 6


def race_threads(url: str, job_id: str) -> list[str]:
    """CONTENDERS threads, each on its own engine, take the lease at the same instant."""
    barrier = threading.Barrier(CONTENDERS)
    winners: list[str] = []
    errors: list[BaseException] = []

    def contend(i: int) -> None:
        engine = make_engine(url)
        try:
            with Session(engine) as db:
                db.connection()  # connect before the barrier so the UPDATEs really collide
                barrier.wait()
                if acquire_lease(db, job_id, f"worker-{i}", ttl_s=30) is not None:
                    winners.append(f"worker-{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(CONTENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return winners


def _contend_process(url: str, job_id: str, i: int, barrier, results) -> None:  # noqa: ANN001
    engine = make_engine(url)
    with Session(engine) as db:
        db.connection()
        barrier.wait()
        results.put(f"worker-{i}" if acquire_lease(db, job_id, f"worker-{i}", ttl_s=30) else "")
    engine.dispose()


def test_threads_racing_for_the_lease_have_one_winner(db: Session, database_url: str) -> None:
    for _ in range(3):
        job = make_job(db)
        winners = race_threads(database_url, job.id)
        assert len(winners) == 1
        db.expire_all()
        job = db.get(Job, job.id)
        assert job.status == states.RUNNING
        assert job.lease_owner == winners[0] and job.lease_attempt == 1


def test_processes_racing_for_the_lease_have_one_winner(db: Session, database_url: str) -> None:
    job = make_job(db)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend_process, args=(database_url, job.id, i, barrier, results)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in procs]
    assert len([o for o in outcomes if o]) == 1
    db.expire_all()
    assert db.get(Job, job.id).lease_owner in outcomes


def test_a_live_lease_is_kept_and_a_dead_one_taken_over(db: Session) -> None:
    job = make_job(db)
    assert acquire_lease(db, job.id, "a", ttl_s=30) is not None
    assert acquire_lease(db, job.id, "b", ttl_s=30) is None
    assert heartbeat(db, job.id, "a", 1) is not None

    time.sleep(0.3)
    taken = acquire_lease(db, job.id, "b", ttl_s=0.1)  # a's heartbeat is now older than the TTL
    assert taken is not None and taken.lease_owner == "b" and taken.lease_attempt == 2
    assert heartbeat(db, job.id, "a", 1) is None  # a learns it lost the job
    assert lock_leased_job(db, job.id, "a", 1) is None  # and cannot write its final status
    assert lock_leased_job(db, job.id, "b", 2) is not None
    db.rollback()


def test_a_finished_or_cancelled_job_cannot_be_leased(db: Session) -> None:
    done = make_job(db)
    states.transition(db, done, states.CANCELLED)
    db.commit()
    assert acquire_lease(db, done.id, "a", ttl_s=30) is None
    assert acquire_lease(db, "ftjob-missing", "a", ttl_s=30) is None
