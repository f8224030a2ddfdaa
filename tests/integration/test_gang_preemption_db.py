"""Priorities and preemption treat a job across hosts as one job (core/gang_claims.py,
worker/gang_place.py): a waiting one pauses lower-priority jobs on every host it needs and those
hosts drain to it; a running one pauses on all its hosts for a higher-priority job; two such
jobs never hold parts of each other's hosts. Through placement.take with real GpuPools (lock
files in a temporary folder), the worker registry in Redis and the database, SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core import control, gang, states, workers
from core.jobs import acquire_lease
from core.metrics import ServiceCollector
from core.models import GangClaim, GangMember, Job, JobEvent
from core.settings import get_settings
from tests.conftest import reset_caches
from tests.integration.conftest import make_job
from tests.integration.test_reservations import deliver, row
from worker.gpus import GpuPool, Reservation
from worker.preemption import coming_free

# Claims race between hosts on conditional writes and a unique key: both databases.
pytestmark = pytest.mark.dialects

LOCKS: dict[str, Reservation] = {}  # the GPU locks of each job, kept (a dropped Reservation closes them)


@pytest.fixture
def pools(db: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, GpuPool]:
    monkeypatch.setenv("TUNEQ_MIN_FREE_DISK_GIB", "0")
    reset_caches()
    LOCKS.clear()
    return {h: GpuPool(1, tmp_path / h, "gpu", host=h) for h in ("host-a", "host-b", "host-c")}


def sync(pools: dict[str, GpuPool]) -> None:
    """Each host's worker refreshes its registry entry (free GPUs), as its HostThread does."""
    for h, p in pools.items():
        workers.register(f"w-{h}", h, p.count, "gpu", 60, free=p.free(), gpu_info=[], disk_full=False)


def queued(db: Session, priority: int, nodes: int = 1) -> Job:
    job = make_job(db, nodes=nodes) if nodes > 1 else make_job(db)
    job.priority = priority
    db.commit()
    return job


def running_on(db: Session, pool: GpuPool, priority: int) -> Job:
    job = queued(db, priority)
    leased = acquire_lease(db, job.id, f"w-{pool.host}", 30, host=pool.host)
    assert leased is not None
    LOCKS[job.id] = pool.reserve(1, owner=job.id)
    return leased


def gang_running(db: Session, pools: dict[str, GpuPool], priority: int, leader: str, follower: str) -> Job:
    job = queued(db, priority, nodes=2)
    led = gang.form(db, job.id, f"w-{leader}", leader, [follower], 1)
    assert led is not None and gang.join(db, job.id, 1, led.lease_attempt, f"w-{follower}")
    LOCKS[job.id] = pools[leader].reserve(1, owner=job.id)
    LOCKS[job.id + "/1"] = pools[follower].reserve(1, owner=job.id)
    return led


def pause_done(db: Session, pools: dict[str, GpuPool], job: Job) -> None:
    """The worker of a job asked to pause: the trainer checkpointed, the job is paused (and
    re-queued when preempted), its GPUs are given back."""
    job = db.get(Job, job.id, populate_existing=True)
    job.pause_requested = False
    states.transition(db, job, states.PAUSED, "paused")
    control.after_pause(db, job)
    db.commit()
    for key in (job.id, job.id + "/1"):
        if key in LOCKS:
            pools["host-a"].release(LOCKS.pop(key))  # (any pool: a release closes the lock files)
    sync(pools)


def claims(db: Session) -> dict[str, str]:
    db.expire_all()
    out = {c.host: c.job_id for c in db.scalars(select(GangClaim))}
    db.rollback()
    return out


def test_a_waiting_gang_pauses_lower_jobs_on_every_host_it_needs_and_those_hosts_drain_to_it(
        db: Session, pools: dict[str, GpuPool]) -> None:
    a, b, c = pools.values()
    low_a, low_b, high_c = running_on(db, a, 0), running_on(db, b, 0), running_on(db, c, 9)
    sync(pools)
    big = queued(db, 5, nodes=2)

    # One delivery, on host A: both hosts it needs are claimed and both low jobs asked to pause;
    # the job of higher priority on host C is left alone.
    assert deliver(db, a, big) == "deferred"
    assert claims(db) == {"host-a": big.id, "host-b": big.id}
    for low in (low_a, low_b):
        assert row(db, low).pause_requested and row(db, low).preempted_by == big.id
    assert not row(db, high_c).pause_requested
    assert deliver(db, c, big) == "deferred"  # looked at again: nobody is paused twice
    assert db.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.type == "preempted")) == 2
    db.rollback()

    # Host A is free first: neither the preempted job nor another queued one takes it back.
    pause_done(db, pools, low_a)
    other = queued(db, 0)
    assert row(db, low_a).status == states.QUEUED
    assert deliver(db, a, low_a) == "deferred" and deliver(db, a, other) == "deferred"
    assert a.free() == 1 and row(db, big).status == states.QUEUED

    # Host B is free too: whichever message comes to a claimed host starts the big job there, even
    # behind a job of higher priority that no host of its size could run.
    huge = queued(db, 9)
    huge.gpus = 2
    db.commit()
    pause_done(db, pools, low_b)
    assert deliver(db, b, low_b) == big.id
    started = row(db, big)
    assert started.status == states.RUNNING
    members = sorted((m.node_rank, m.host) for m in gang.members(db, big.id))
    db.rollback()
    assert members == [(0, "host-b"), (1, "host-a")]
    assert claims(db) == {}  # the claims went with the lease
    assert gang.awaited_here(db, "host-a")


def test_a_running_gang_pauses_as_one_job_for_a_higher_priority_job_and_waits_for_both_hosts(
        db: Session, pools: dict[str, GpuPool]) -> None:
    a, b, c = pools.values()
    low = gang_running(db, pools, 0, "host-a", "host-b")
    running_on(db, c, 9)  # host C is busy with other work
    sync(pools)
    urgent = queued(db, 5)
    # On the follower's host: the gang's lock there is the whole job's, which is asked to pause.
    assert deliver(db, b, urgent) == "deferred"
    assert row(db, low).pause_requested and row(db, low).preempted_by == urgent.id
    # A follower whose ranks paused is no failure of the attempt: the leader's ranks pause too.
    gang.member_exited(db, low.id, 1, low.lease_attempt, gang.PAUSED)
    assert gang.problem(db, low.id, low.lease_attempt, ttl_s=30, join_by=float("inf"), exit_grace_s=-1) is None
    pause_done(db, pools, low)
    assert row(db, low).status == states.QUEUED and gang.members(db, low.id) == []
    assert deliver(db, b, urgent) == urgent.id
    # Host A alone is free: the paused gang needs both, and holds nothing meanwhile.
    sync(pools)
    assert deliver(db, a, low) == "deferred"
    assert row(db, low).status == states.QUEUED and claims(db) == {} and a.free() == 1


def test_gangs_claim_all_their_hosts_or_none_and_only_a_higher_priority_takes_them_over(
        db: Session, pools: dict[str, GpuPool]) -> None:
    a, b, c = pools.values()
    for p in (a, b, c):
        running_on(db, p, 0)
    sync(pools)
    first, second = queued(db, 5, nodes=2), queued(db, 5, nodes=2)
    assert deliver(db, a, first) == "deferred"
    assert sorted(claims(db).values()) == [first.id, first.id]
    # The same priority: the second neither takes the first's hosts nor holds the one left over
    # (it would wait holding it while the first waits for nothing: no partial holds, no deadlock).
    for p in (a, b, c):
        deliver(db, p, second)
    assert sorted(claims(db).values()) == [first.id, first.id]
    # A higher priority takes the hosts over, all of the first's claims at once; the first does
    # not take them back.
    urgent = queued(db, 9, nodes=2)
    assert deliver(db, c, urgent) in ("deferred", urgent.id)
    held = claims(db)
    assert sorted(held.values()) == [urgent.id, urgent.id] and first.id not in held.values()
    for p in (a, b, c):
        deliver(db, p, first)
    assert first.id not in claims(db).values()
    # A claim held past twice the join timeout is given up and planned afresh.
    db.execute(update(GangClaim).values(created_at=GangClaim.created_at - 2 * get_settings().gang_join_timeout_s - 1))
    db.commit()
    assert deliver(db, a, urgent) == "deferred" and claims(db) == {}
    deliver(db, c, urgent)
    assert sorted(claims(db).values()) == [urgent.id, urgent.id]


def test_the_busy_gpu_metric_counts_a_gang_on_every_host(db: Session, pools: dict[str, GpuPool]) -> None:
    job = gang_running(db, pools, 0, "host-a", "host-b")
    sync(pools)
    busy = {s.labels["worker"]: s.value for m in ServiceCollector().collect()
            if m.name == "tuneq_worker_gpus_busy" for s in m.samples}
    assert busy == {"w-host-a": 1, "w-host-b": 1, "w-host-c": 0}, job.id
    assert db.scalar(select(GangMember.worker_id).where(GangMember.node_rank == 1)) == "w-host-b"


def test_a_followers_gpus_taken_as_the_gang_formed_are_paused_for_it_or_given_up_at_once(
        db: Session, pools: dict[str, GpuPool]) -> None:
    b = pools["host-b"]
    taker = running_on(db, b, 0)  # this host's worker started it just as a gang reserved the host
    # Of the same priority it keeps the GPU: the part gives up now, not after the join timeout.
    same = queued(db, 0, nodes=2)
    assert not coming_free(db, b, same, 1)
    assert not row(db, taker).pause_requested
    # A gang of higher priority pauses it and waits for the GPU.
    higher = queued(db, 5, nodes=2)
    assert coming_free(db, b, higher, 1)
    assert row(db, taker).pause_requested and row(db, taker).preempted_by == higher.id
    assert coming_free(db, b, higher, 1)  # being given back: asked once, waited for
    pause_done(db, pools, taker)
    # A lock of the gang job itself is an earlier attempt's part, stopping: it comes free.
    LOCKS["old part"] = b.reserve(1, owner=same.id)
    same = db.get(Job, same.id)
    same.status = states.RUNNING
    db.commit()
    assert b.free() == 0 and coming_free(db, b, same, 1)
