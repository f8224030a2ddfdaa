"""A job of many GPUs is not starved by smaller jobs behind it: once it has been passed over for
`reserve_after_h` (smaller jobs behind it started on a host it fits, whose free GPUs were too
few for it), the next such host is reserved for it and drains to it. Through placement.take with
real GpuPools (lock files in a temporary folder) on the real database, SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import states
from core.jobs import acquire_lease
from core.models import Job, now
from core.settings import get_settings
from tests.conftest import reset_caches
from tests.integration.conftest import make_job
from worker import placement
from worker.gpus import GpuPool, Reservation

# Reservations are claimed by conditional UPDATEs that two hosts may race on: both databases.
pytestmark = pytest.mark.dialects

HOUR = 3600.0


def queued(db: Session, gpus: int, created: float) -> Job:
    job = make_job(db)
    job.gpus, job.created_at = gpus, created
    db.commit()
    return job


def running_on(db: Session, pool: GpuPool, gpus: int) -> tuple[Job, Reservation]:
    """A job of `gpus` running on the pool's host, holding its GPUs' locks."""
    job = queued(db, gpus, created=now() - 10 * HOUR)
    leased = acquire_lease(db, job.id, f"{pool.host}/w", 30, host=pool.host)
    assert leased is not None
    held = pool.reserve(gpus, owner=job.id)
    assert held is not None
    return leased, held


def finish(db: Session, pool: GpuPool, job: Job, held: Reservation) -> None:
    job = db.get(Job, job.id, populate_existing=True)
    states.transition(db, job, states.SUCCEEDED, "done")
    db.commit()
    pool.release(held)


GPUS: dict[str, Reservation] = {}  # the GPU locks of each job a delivery started


def deliver(db: Session, pool: GpuPool, job: Job) -> str:
    """A delivery of `job` to a worker of the pool's host: the id of the job it started, or why none."""
    taken = placement.take(db, pool, job.id, f"{pool.host}/w", get_settings())
    if isinstance(taken, str):
        return taken
    leased, gpus = taken
    GPUS[leased.id] = gpus
    return leased.id


def row(db: Session, job: Job) -> Job:
    fresh = db.get(Job, job.id, populate_existing=True)
    db.rollback()
    return fresh


def aged(db: Session, job: Job, hours: float) -> None:
    db.execute(update(Job).where(Job.id == job.id).values(passed_over_at=now() - hours * HOUR))
    db.commit()


@pytest.fixture
def reserve_after(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    def set_(hours: float) -> None:
        monkeypatch.setenv("TUNEQ_RESERVE_AFTER_H", str(hours))
        monkeypatch.setenv("TUNEQ_MIN_FREE_DISK_GIB", "0")
        reset_caches()
    return set_


def host_and_big_job(db: Session, tmp_path: Path, reserve_after, busy: int) -> tuple[GpuPool, Reservation, Job]:  # noqa: ANN001
    """Reservations after 1 h; host-a of 4 GPUs, `busy` of them held by a running job (its
    Reservation is returned: dropped, it would close its lock files); a queued 4-GPU job."""
    reserve_after(1.0)
    host = GpuPool(4, tmp_path / "a", "gpu", host="host-a")
    _, gpus = running_on(db, host, busy)
    return host, gpus, queued(db, 4, created=now() - 5 * HOUR)


@pytest.mark.parametrize("hours", [1.0, 0.0], ids=["reserving", "never"])
def test_a_big_job_passed_over_too_long_gets_a_host_that_drains_to_it(
        db: Session, tmp_path: Path, reserve_after, hours: float) -> None:
    reserve_after(hours)
    host = GpuPool(4, tmp_path / "a", "gpu", host="host-a")
    small_host = GpuPool(1, tmp_path / "b", "gpu", host="host-b")
    first, first_gpus = running_on(db, host, 2)
    big = queued(db, 4, created=now() - 5 * HOUR)
    smalls = [queued(db, 1, created=now() - 4 * HOUR + i) for i in range(4)]

    # Two GPUs are free: the big job, first in the queue, does not fit them; a small one starts.
    assert deliver(db, host, smalls[0]) == smalls[0].id
    assert row(db, big).passed_over_at is not None and row(db, big).reserved_host is None
    # Passed over for longer than reserve_after_h (twice: any host that fits it will do): the host
    # is reserved for it and starts no other.
    aged(db, big, 3.0)
    if hours == 0:  # reservations off: backfill goes on, the big job waits for a chance
        assert deliver(db, host, smalls[1]) == smalls[1].id
        assert row(db, big).reserved_host is None
        return
    assert deliver(db, host, smalls[1]) == "deferred"
    assert row(db, big).reserved_host == "host-a"
    assert deliver(db, host, smalls[1]) == "deferred"  # one GPU free, a 1-GPU job queued: it drains
    assert row(db, smalls[1]).status == states.QUEUED
    # A host the big job does not fit goes on as before.
    assert deliver(db, small_host, smalls[1]) == smalls[1].id
    # The host's jobs end: its GPUs go to the big job, whichever message woke the worker.
    finish(db, host, first, first_gpus)
    finish(db, host, smalls[0], GPUS[smalls[0].id])
    assert deliver(db, host, smalls[2]) == big.id
    started = row(db, big)
    assert started.status == states.RUNNING and started.host == "host-a"
    assert started.reserved_host is None and started.passed_over_at is None
    # Reserved for nothing now: backfill again.
    assert deliver(db, small_host, smalls[3]) == "deferred"  # its one GPU is busy
    assert host.free() == 0



def test_a_job_holds_one_host_and_a_dead_hosts_reservation_passes_to_another(
        db: Session, tmp_path: Path, reserve_after) -> None:
    reserve_after(1.0)
    a, b = (GpuPool(4, tmp_path / n, "gpu", host=n) for n in ("host-a", "host-b"))
    on_a, gpus_a = running_on(db, a, 2)
    on_b, gpus_b = running_on(db, b, 2)  # (kept: a dropped Reservation closes its lock files)
    big = queued(db, 4, created=now() - 5 * HOUR)
    smalls = [queued(db, 1, created=now() - 4 * HOUR + i) for i in range(3)]
    aged(db, big, 1.5)  # past reserve_after_h; each host has half its GPUs free

    assert deliver(db, a, smalls[0]) == "deferred"
    assert row(db, big).reserved_host == "host-a"
    # Host b would pass the big job over too, but host a, alive, holds it: b backfills.
    assert deliver(db, b, smalls[0]) == smalls[0].id
    assert row(db, big).reserved_host == "host-a"
    # Host a dies (its job's lease is no longer renewed): the next host to pass the job over takes it.
    db.execute(update(Job).where(Job.id == on_a.id).values(lease_heartbeat_at=now() - 3600))
    db.commit()
    aged(db, big, 2.5)  # host b has one GPU of four free now: it takes a job passed over this long
    assert deliver(db, b, smalls[1]) == "deferred"
    assert row(db, big).reserved_host == "host-b"
    assert row(db, smalls[1]).status == states.QUEUED


def test_a_higher_priority_job_still_goes_first_on_a_reserved_host(
        db: Session, tmp_path: Path, reserve_after) -> None:
    host, held, big = host_and_big_job(db, tmp_path, reserve_after, busy=2)
    small = queued(db, 1, created=now() - 4 * HOUR)
    aged(db, big, 2.0)
    assert deliver(db, host, small) == "deferred"
    assert row(db, big).reserved_host == "host-a"
    urgent = queued(db, 1, created=now())
    urgent.priority = 5
    db.commit()
    assert deliver(db, host, urgent) == urgent.id
    assert deliver(db, host, small) == "deferred"  # the reservation stands


def test_a_host_with_half_the_gpus_free_is_reserved_first_any_host_later(
        db: Session, tmp_path: Path, reserve_after) -> None:
    host, held, big = host_and_big_job(db, tmp_path, reserve_after, busy=3)
    smalls = [queued(db, 1, created=now() - 4 * HOUR + i) for i in range(2)]
    aged(db, big, 1.5)
    # One GPU of four free: this host would drain slowly; it backfills while another may serve.
    assert deliver(db, host, smalls[0]) == smalls[0].id
    assert row(db, big).reserved_host is None
    host.release(GPUS.pop(smalls[0].id))  # that job ended at once: one GPU free again
    aged(db, big, 2.5)  # passed over twice reserve_after_h: any host that fits it is reserved
    assert deliver(db, host, smalls[1]) == "deferred"
    assert row(db, big).reserved_host == "host-a"
