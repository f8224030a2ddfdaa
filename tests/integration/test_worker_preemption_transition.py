"""Preemption while an earlier victim is between `paused -> queued` and unlocking its GPU.

A preempted job is re-queued (control.after_pause) by its worker before that worker releases the
job's GPU lock. A dispatcher looking in that window sees a locked GPU with no running job behind
it; placement.preempt_for must count that GPU as being freed rather than pause a second job.

The GPU locks are held by helper processes, one per GPU, as the workers running those jobs would
hold them; the decision runs in this process through placement.take, with a real GpuPool on a
temporary lock directory and a real database (SQLite and PostgreSQL).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from core import control, states
from core.jobs import acquire_lease
from core.models import Job
from core.settings import get_settings
from tests.integration.conftest import make_job
from worker import placement
from worker.gpus import GpuPool

# Preemption decisions read rows other processes write: checked on both databases.
pytestmark = pytest.mark.dialects


class GpuHolder:
    """Another process holding one GPU's lock file, its text naming the job, until stopped."""

    def __init__(self, pool: GpuPool, index: int, job_id: str):
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, time
            f = open({str(pool._path(index))!r}, "a+")
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.seek(0); f.truncate(); f.write({job_id!r}); f.flush()
            print("held", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def hold() -> Iterator[Callable[[GpuPool, int, str], GpuHolder]]:
    holders: list[GpuHolder] = []

    def start(pool: GpuPool, index: int, job_id: str) -> GpuHolder:
        holders.append(GpuHolder(pool, index, job_id))
        return holders[-1]

    yield start
    for h in holders:
        h.stop()


def queued_job(db: Session, priority: int, gpus: int = 1) -> Job:
    job = make_job(db)
    job.priority, job.gpus = priority, gpus
    db.commit()
    return job


def running_job(db: Session, priority: int) -> Job:
    job = queued_job(db, priority)
    leased = acquire_lease(db, job.id, f"worker-of-{job.id}", 30)
    assert leased is not None and leased.status == states.RUNNING
    db.commit()
    return leased


def paused_and_requeued(db: Session, job_id: str) -> None:
    """What the victim's worker writes when its trainer stops at the pause (JobRun.finish),
    while that worker still holds the job's GPU lock."""
    job = db.get(Job, job_id, populate_existing=True)
    assert job is not None and job.pause_requested
    job.pause_requested = False
    states.transition(db, job, states.PAUSED, "Job paused.")
    control.after_pause(db, job)
    db.commit()
    assert job.status == states.QUEUED


def preempted_earlier(db: Session, job: Job) -> None:
    """As control.preempt leaves a victim, for a job that has run and ended since."""
    job.pause_requested = True
    job.preempted_by = "ftjob-earlier"
    db.commit()


def pause_requested(db: Session, *jobs: Job) -> dict[str, bool]:
    db.expire_all()
    out = {j.id: bool(db.get(Job, j.id).pause_requested) for j in jobs}
    db.rollback()
    return out


def deliver(db: Session, pool: GpuPool, job: Job):  # noqa: ANN201
    """A delivery of `job` to a worker slot of this host: placement.take as run_job calls it."""
    return placement.take(db, pool, job.id, "dispatching-worker", get_settings())


def gpu0_in_transition(db: Session, pool: GpuPool, hold, priority_on_gpu1: int):  # noqa: ANN001, ANN201
    """GPU 0 held by a priority-1 job that was preempted and is queued again (still locked), GPU 1
    by a running job of `priority_on_gpu1`, and a queued priority-5 job that needs both GPUs."""
    leaving, other = running_job(db, priority=1), running_job(db, priority=priority_on_gpu1)
    holders = (hold(pool, 0, leaving.id), hold(pool, 1, other.id))
    preempted_earlier(db, leaving)
    paused_and_requeued(db, leaving.id)
    return leaving, other, queued_job(db, priority=5, gpus=2), holders


def test_the_lowest_priority_running_job_is_preempted_for_a_waiting_higher_one(
        db: Session, tmp_path: Path, hold) -> None:
    pool = GpuPool(2, tmp_path / "locks")
    low, lower = running_job(db, priority=2), running_job(db, priority=1)
    hold(pool, 0, low.id)
    hold(pool, 1, lower.id)
    high = queued_job(db, priority=5)
    assert pool.free() == 0 and pool.holders() == {0: low.id, 1: lower.id}

    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, low, lower) == {low.id: False, lower.id: True}
    # Asked once: a second delivery counts the GPU of the job already pausing as being given back.
    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, low, lower) == {low.id: False, lower.id: True}


def test_a_gpu_whose_job_was_requeued_but_is_still_locked_is_not_a_reason_to_preempt_another(
        db: Session, tmp_path: Path, hold) -> None:
    pool = GpuPool(2, tmp_path / "locks")
    low, lower = running_job(db, priority=2), running_job(db, priority=1)
    hold(pool, 0, low.id)
    lower_gpu = hold(pool, 1, lower.id)
    high = queued_job(db, priority=5)
    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, low, lower) == {low.id: False, lower.id: True}

    # The preempted job is queued again, but its worker has not unlocked GPU 1 yet.
    paused_and_requeued(db, lower.id)
    assert pool.free() == 0 and pool.holders() == {0: low.id, 1: lower.id}
    assert placement.preempt_for(db, pool, placement.waiting(db), pool.free()) == []
    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, low, lower) == {low.id: False, lower.id: False}
    assert db.get(Job, low.id, populate_existing=True).status == states.RUNNING
    db.rollback()

    # The lock is released: the higher job, first in the queue, takes that GPU.
    lower_gpu.stop()
    taken = deliver(db, pool, high)
    assert not isinstance(taken, str), taken
    job, reservation = taken
    try:
        assert job.id == high.id and job.status == states.RUNNING and reservation.indices == [1]
    finally:
        pool.release(reservation)


def test_a_two_gpu_job_preempts_one_more_job_when_one_of_its_gpus_is_already_being_freed(
        db: Session, tmp_path: Path, hold) -> None:
    """GPU 0 is in transition (its job re-queued, still locked), GPU 1 runs a lower job: the
    two-GPU job needs exactly one more preemption, of the job on GPU 1, and then no other."""
    pool = GpuPool(2, tmp_path / "locks")
    leaving, low, high, _ = gpu0_in_transition(db, pool, hold, priority_on_gpu1=2)

    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, leaving, low) == {leaving.id: False, low.id: True}
    assert deliver(db, pool, high) == "deferred"  # low pausing + GPU 0 unlocking cover both GPUs
    assert pause_requested(db, leaving, low) == {leaving.id: False, low.id: True}


def test_no_preemption_when_the_remaining_gpu_runs_a_job_that_outranks_the_waiting_one(
        db: Session, tmp_path: Path, hold) -> None:
    pool = GpuPool(2, tmp_path / "locks")
    leaving, top, high, _ = gpu0_in_transition(db, pool, hold, priority_on_gpu1=9)

    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, leaving, top) == {leaving.id: False, top.id: False}


def test_gpus_freed_for_a_waiting_two_gpu_job_are_not_backfilled_by_lower_jobs(
        db: Session, tmp_path: Path, hold) -> None:
    """GPU 0 is unlocked while the job on GPU 1 is still pausing for the two-GPU job: the job just
    preempted from GPU 0 must not take it back (else the head never finds both GPUs free)."""
    pool = GpuPool(2, tmp_path / "locks")
    leaving, low, high, (gpu0, gpu1) = gpu0_in_transition(db, pool, hold, priority_on_gpu1=2)
    assert deliver(db, pool, high) == "deferred"
    assert pause_requested(db, leaving, low) == {leaving.id: False, low.id: True}

    gpu0.stop()
    assert pool.free() == 1
    assert deliver(db, pool, leaving) == "deferred"  # no backfill onto the GPU freed for `high`
    assert deliver(db, pool, high) == "deferred"  # one of its two GPUs is still in use
    assert db.get(Job, leaving.id, populate_existing=True).status == states.QUEUED
    db.rollback()

    # low reaches its pause and is re-queued, then its worker unlocks GPU 1: high takes both.
    paused_and_requeued(db, low.id)
    gpu1.stop()
    taken = deliver(db, pool, leaving)  # whichever delivery comes first, the head runs
    assert not isinstance(taken, str), taken
    job, reservation = taken
    try:
        assert job.id == high.id and sorted(reservation.indices) == [0, 1]
    finally:
        pool.release(reservation)


def test_free_gpus_are_still_backfilled_when_nothing_is_being_freed(db: Session, tmp_path: Path, hold) -> None:
    """A two-GPU job that outranks nobody on the host waits; a lower one-GPU job may use the free GPU."""
    pool = GpuPool(2, tmp_path / "locks")
    top = running_job(db, priority=9)
    hold(pool, 1, top.id)
    high = queued_job(db, priority=5, gpus=2)
    small = queued_job(db, priority=0)
    taken = deliver(db, pool, high)  # a delivery runs the first queued job that fits: small
    assert not isinstance(taken, str), taken
    job, reservation = taken
    try:
        assert job.id == small.id and reservation.indices == [0]
    finally:
        pool.release(reservation)


def test_a_progress_write_racing_the_preemption_does_not_lose_it(db: Session):
    """The victim's worker stores its trainer's metrics into `progress` all the time. On the lent
    H200 it read the job just before control.preempt committed and wrote progress back after:
    when the marker lived in `progress` it was gone, and the paused job never went back to the
    queue. The worker's read, the preemption, then the worker's write, in that order here."""
    from core.db import get_sessionmaker
    from worker.events import ProgressTracker

    victim = running_job(db, priority=0)
    high = queued_job(db, priority=10)
    worker_db = get_sessionmaker()()
    try:
        mine = worker_db.get(Job, victim.id)
        assert mine is not None
        _ = mine.progress  # loaded by the pump, before the preemption commits
        assert control.preempt(db, db.get(Job, victim.id, populate_existing=True), high)
        ProgressTracker(Path("/nonexistent")).apply(
            worker_db, mine, {"type": "metrics", "time": 1.0, "data": {"step": 7, "total_steps": 100}})
        worker_db.commit()
    finally:
        worker_db.close()
    paused_and_requeued(db, victim.id)
    assert db.get(Job, victim.id, populate_existing=True).progress["step"] == 7
