"""Job service functions shared by the API and the worker.

The lease is how the database, not the broker, decides who runs a job: Celery on Redis may
deliver the same task twice (visibility timeout, restarts), and only the delivery that takes the
lease in one transaction runs it.
"""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import fairshare, states
from core.models import File, Job, now
from core.retries import retry_or_fail


class JobError(ValueError):
    """A request about a job that cannot be honoured; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


def create_job(
    db: Session,
    *,
    spec: dict[str, Any],
    model: str,
    method: str,
    training_file: File,
    validation_file: File | None = None,
    suffix: str | None = None,
    owner_id: str | None = None,
    priority: int = 0,
    gpus: int = 1,
    plan: dict[str, Any] | None = None,
    validated: bool = True,
    metadata: dict[str, str] | None = None,
) -> Job:
    """Insert a job and move it to `queued` (or `failed` if its files are not usable).

    validated=False leaves it in `validating_files`, for a data check that ends after the call.
    The caller commits, then calls core.queue.enqueue_job(job.id).
    """
    nodes = int(spec.get("nodes") or 1)
    check_gpus_fit(gpus, nodes)
    job = Job(
        spec=spec, model=model, method=method, training_file=training_file.id,
        validation_file=validation_file.id if validation_file else None, suffix=suffix,
        owner_id=owner_id, priority=priority, gpus=gpus, plan=plan, job_metadata=metadata or None,
    )
    db.add(job)
    db.flush()
    states.add_event(db, job, "Validating training file.", type="status", data={"to": states.VALIDATING})
    for f, field in ((training_file, "training_file"), (validation_file, "validation_file")):
        if f is not None and f.status != "processed":
            raise JobError(f"{field}: file {f.id} failed validation; fix the file and upload it again", field)
    if validated:
        states.transition(db, job, states.QUEUED, "Job queued.")
    return job


def spread_over_hosts(gpus: int, nodes: int | None) -> tuple[int, int]:
    """(gpus per host, nodes) for a job that asks for more GPUs than one registered host has and
    names no `nodes`: the fewest hosts that hold them in equal parts, when some do. Otherwise the
    request as it is (check_gpus_fit then says what does not fit)."""
    from core import workers

    if nodes not in (None, 1) or gpus <= 1:
        return gpus, nodes or 1
    try:
        sizes = sorted(workers.host_sizes().values(), reverse=True)
    except redis.RedisError:
        return gpus, 1
    if not sizes or gpus <= sizes[0]:
        return gpus, 1
    for n in range(2, len(sizes) + 1):
        if gpus % n == 0 and sizes[n - 1] >= gpus // n:
            return gpus // n, n
    return gpus, 1


def check_gpus_fit(gpus: int, nodes: int = 1) -> None:
    """Refuse a job that no set of registered hosts could hold: `nodes` distinct hosts of at least
    `gpus` GPUs each. With no worker registered, accept (hosts may join later). The registry lives
    in Redis; if it is unreachable, so is the queue, and enqueueing reports that."""
    from core import workers

    try:
        sizes = workers.host_sizes()
    except redis.RedisError:
        return
    if not sizes:
        return
    largest = max(sizes.values())
    if gpus > largest:
        raise JobError(
            f"gpus: {gpus} GPUs requested, but the largest registered host has {largest}; allowed 1..{largest}",
            "gpus", "gpus_unavailable",
        )
    enough = sum(1 for n in sizes.values() if n >= gpus)
    if nodes > enough:
        raise JobError(
            f"nodes: {nodes} hosts of {gpus} GPUs each requested, but {enough} of the {len(sizes)} registered hosts "
            f"have {gpus} or more; allowed 1..{enough}",
            "nodes", "gpus_unavailable",
        )


def request_cancel(db: Session, job: Job) -> Job:
    """Cancel now if nothing runs it; otherwise flag it for the worker that holds the lease.

    The flag is set by an UPDATE conditioned on the status this request saw, which also takes
    the row's write lock: a worker that ended the job in between makes the condition fail, and
    the request re-reads instead of overwriting a finished job.
    """
    for _ in range(5):
        observed = job.status
        # Done already: a client's retry (its first answer lost) gets the job, not an error.
        if observed in (states.CANCELLING, states.CANCELLED):
            return job
        if observed in states.TERMINAL:
            raise states.IllegalTransition(job.id, observed, states.CANCELLED)
        res = db.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == observed)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1:
            db.refresh(job)
            if observed == states.RUNNING:
                return states.transition(db, job, states.CANCELLING, "Cancellation requested.")
            return states.transition(db, job, states.CANCELLED, "Job cancelled.")
        db.rollback()
        db.refresh(job)
    raise states.IllegalTransition(job.id, job.status, states.CANCELLED)


def acquire_lease(db: Session, job_id: str, worker_id: str, ttl_s: float | None, host: str | None = None) -> Job | None:
    """Take the job's lease if it is queued, or (ttl_s given) running under a lease older than ttl_s.

    One conditional UPDATE does it, so two deliveries racing on two workers cannot both win.
    Returns the job (now `running`, with a new attempt number) or None when another holds it.
    `host`, when given, is recorded as the job's host with the lease.
    """
    job = claim_lease(db, job_id, worker_id, ttl_s, host)
    if job is None:
        return None
    if job.status == states.QUEUED:
        states.transition(db, job, states.RUNNING, f"Job started on {worker_id} (attempt {job.lease_attempt}).")
    else:
        states.add_event(db, job, f"Lease taken over by {worker_id} (attempt {job.lease_attempt}).", type="status")
    db.commit()
    return job


def claim_lease(db: Session, job_id: str, worker_id: str, ttl_s: float | None, host: str | None = None) -> Job | None:
    """The conditional UPDATE of acquire_lease, uncommitted: a queued job, or (with ttl_s) one
    running under a lease older than ttl_s, gets this worker and a new attempt (and `host`, when
    given). None: not won."""
    t = now()
    takeable = Job.status == states.QUEUED
    if ttl_s is not None:
        stale = (Job.lease_heartbeat_at.is_(None)) | (Job.lease_heartbeat_at < t - ttl_s)
        takeable = takeable | ((Job.status == states.RUNNING) & stale)
    res = db.execute(
        update(Job).where(Job.id == job_id).where(takeable)
        .values(lease_owner=worker_id, lease_heartbeat_at=t, lease_attempt=Job.lease_attempt + 1,
                **({"host": host} if host is not None else {}))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.rollback()
        return None
    job = db.get(Job, job_id, populate_existing=True)
    assert job is not None
    return job


def heartbeat(db: Session, job_id: str, worker_id: str, attempt: int) -> Job | None:
    """Renew the lease; None means it was lost (reaped or taken over) and the run must stop."""
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.lease_attempt == attempt)
        .values(lease_heartbeat_at=now())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.commit()
        return None
    job = db.get(Job, job_id, populate_existing=True)
    if job is not None:  # the UPDATE holds the row's lock: charging its GPU use cannot race
        fairshare.accrue(db, job, now())
    db.commit()
    return job


def holds_lease(job: Job, worker_id: str, attempt: int) -> bool:
    return job.lease_owner == worker_id and job.lease_attempt == attempt


def lock_leased_job(db: Session, job_id: str, worker_id: str, attempt: int) -> Job | None:
    """Renew the lease inside an open transaction and return the fresh job, or None if it is lost.

    The conditional UPDATE takes the row's write lock (PostgreSQL) or the database's (SQLite), so
    a reaper or a second worker cannot change the job between this check and the caller's
    commit: the worker's final transition happens only while it still holds the lease.
    """
    res = db.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == worker_id, Job.lease_attempt == attempt)
        .values(lease_heartbeat_at=now())
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.rollback()
        return None
    return db.get(Job, job_id, populate_existing=True)


def release_lease(db: Session, job_id: str, worker_id: str, attempt: int, message: str) -> bool:
    """Give a running job back to the queue (worker shutdown); the caller then enqueues it.

    A job whose cancel was requested meanwhile ends cancelled instead. Returns True when the
    job went back to `queued`.
    """
    job = lock_leased_job(db, job_id, worker_id, attempt)
    if job is None:
        return False
    requeued = job.status == states.RUNNING
    if requeued:
        states.transition(db, job, states.QUEUED, message)
    elif job.status == states.CANCELLING:
        states.transition(db, job, states.CANCELLED, "Job cancelled (its worker stopped).")
    db.commit()
    return requeued


def reap_stale(db: Session, ttl_s: float) -> list[str]:
    """Put running jobs whose worker stopped heartbeating back in the queue; return their ids."""
    stale_before = now() - ttl_s
    candidates = db.execute(
        select(Job.id, Job.lease_owner, Job.lease_attempt).where(
            Job.status.in_([states.RUNNING, states.CANCELLING]), Job.lease_heartbeat_at < stale_before
        )
    ).all()
    db.rollback()
    ids = []
    for job_id, owner, attempt in candidates:
        # Claim each job with a conditional UPDATE: between the SELECT and now its worker may
        # have heartbeated or finished, and a plain ORM write would overwrite that.
        res = db.execute(
            update(Job)
            .where(
                Job.id == job_id, Job.lease_owner == owner, Job.lease_attempt == attempt,
                Job.status.in_([states.RUNNING, states.CANCELLING]), Job.lease_heartbeat_at < stale_before,
            )
            .values(lease_heartbeat_at=None)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:
            db.rollback()
            continue
        job = db.get(Job, job_id, populate_existing=True)
        assert job is not None
        # A lost worker is an infrastructure failure: it counts against max_attempts.
        if retry_or_fail(db, job, f"worker {owner} stopped heartbeating"):
            ids.append(job.id)
        db.commit()
    return ids
