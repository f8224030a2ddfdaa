"""A PostgreSQL restart longer than the lease TTL, on a cluster of the test's own: the reaper's
first pass after the database is back must not take a live worker's job (its lease only aged
because nobody could renew it), and a dead worker's job is still reaped once the database has
been seen up for a TTL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core import states
from core.models import Job
from tests.conftest import reset_caches
from tests.integration.conftest import make_job
from tests.pgcluster import PgCluster

TTL = 2.0


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, redis_url: str) -> Iterator[PgCluster]:
    from core.migrate import upgrade_head
    from core.ports import free_port

    pg = PgCluster(free_port())
    try:
        pg.init()
        pg.start()
        url = pg.create_database("tuneq")
        upgrade_head(url)
        for k, v in {"TUNEQ_HOME": str(tmp_path / "home"), "TUNEQ_DATABASE_URL": url, "TUNEQ_REDIS_URL": redis_url,
                     "TUNEQ_LEASE_TTL_S": str(TTL), "TUNEQ_HEARTBEAT_S": "0.2",
                     "TUNEQ_DB_CONNECT_RETRY_S": "0", "TUNEQ_DB_CONNECT_TIMEOUT_S": "2"}.items():
            monkeypatch.setenv(k, v)
        reset_caches()
        yield pg
    finally:
        reset_caches()
        pg.destroy()


def status(job_id: str) -> tuple[str, str | None, int]:
    from core.db import get_sessionmaker

    with get_sessionmaker()() as db:
        job = db.get(Job, job_id)
        return job.status, job.lease_owner, job.lease_attempt


def test_a_restart_longer_than_the_ttl_does_not_make_a_live_lease_stale(cluster: PgCluster) -> None:
    from core.db import get_sessionmaker
    from core.jobs import acquire_lease, heartbeat
    from worker.reaper import DatabaseWatch, probe, reap_once

    db: Session = get_sessionmaker()()
    live, dead = make_job(db), make_job(db)
    assert acquire_lease(db, live.id, "live-worker", None) is not None
    assert acquire_lease(db, dead.id, "dead-worker", None) is not None
    db.close()
    watch = DatabaseWatch()
    deadline = time.monotonic() + 30
    while not watch.may_judge_leases(TTL):  # the reaper's watch, as it stands before the outage
        assert probe(watch) and time.monotonic() < deadline
        time.sleep(0.2)

    cluster.stop()
    assert not probe(watch)  # the reaper's contact during the outage fails
    time.sleep(TTL + 0.5)  # nobody can renew: both leases are older than the TTL now
    cluster.start()
    assert probe(watch)

    # The first pass after the restart judges nothing, though both heartbeats are past the TTL.
    assert reap_once(watch) == []
    assert status(live.id) == (states.RUNNING, "live-worker", 1)
    assert status(dead.id) == (states.RUNNING, "dead-worker", 1)

    # The live worker renews once it reaches the database again; the dead one never does.
    deadline = time.monotonic() + 30
    while not watch.may_judge_leases(TTL):
        with get_sessionmaker()() as s:
            assert heartbeat(s, live.id, "live-worker", 1) is not None
        assert probe(watch) and time.monotonic() < deadline
        time.sleep(0.2)
    with get_sessionmaker()() as s:
        assert heartbeat(s, live.id, "live-worker", 1) is not None
    assert reap_once(watch) == [dead.id]
    assert status(live.id) == (states.RUNNING, "live-worker", 1)
    assert status(dead.id)[0] == states.QUEUED
