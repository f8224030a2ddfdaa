"""The job state machine: the only place a job's status changes.

Every transition is checked against the table below and recorded as an event, so the event log
alone tells a job's history.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.models import Job, JobEvent, now

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
PAUSED = "paused"
CANCELLING = "cancelling"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"

TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

ALLOWED: dict[str, frozenset[str]] = {
    VALIDATING: frozenset({QUEUED, FAILED, CANCELLED}),
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED, PAUSED}),
    # running -> queued: the worker died and the reaper hands the job to the next one.
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLING, CANCELLED, PAUSED, QUEUED}),
    CANCELLING: frozenset({CANCELLED, FAILED, SUCCEEDED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    def __init__(self, job_id: str, current: str, target: str, why: str | None = None):
        super().__init__(f"job {job_id}: cannot go from '{current}' to '{target}'" + (f"; {why}" if why else ""))
        self.current = current
        self.target = target


def add_event(
    db: Session,
    job: Job,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
    created_at: float | None = None,
) -> JobEvent:
    ev = JobEvent(job_id=job.id, message=message, type=type, level=level, data=data, created_at=created_at or now())
    db.add(ev)
    return ev


def transition(
    db: Session,
    job: Job,
    target: str,
    message: str | None = None,
    *,
    error: dict[str, Any] | None = None,
) -> Job:
    """Move `job` to `target` or raise IllegalTransition. The caller commits."""
    current = job.status
    if target not in ALLOWED.get(current, frozenset()):
        raise IllegalTransition(job.id, current, target)
    job.status = target
    t = now()
    from core import fairshare  # it orders by these states: imported here, not at the top

    fairshare.on_transition(db, job, current, target, t)
    if current == QUEUED and target != QUEUED:  # it leaves the queue: a reservation held for it ends
        job.passed_over_at = None
        job.reserved_host = None
        if job.nodes > 1:
            from core import gang_claims

            gang_claims.release(db, job.id)  # its claimed hosts go back to what is queued for them
    if target == RUNNING and job.started_at is None:
        job.started_at = t
    if target in TERMINAL:
        job.finished_at = t
        job.lease_owner = None
        job.lease_heartbeat_at = None
    if target in (QUEUED, PAUSED):
        job.lease_owner = None
        job.lease_heartbeat_at = None
    if current in (RUNNING, CANCELLING) and target not in (RUNNING, CANCELLING) and job.nodes > 1:
        from core import gang

        gang.dissolve(db, job.id)  # the attempt is over: its hosts are free for the next gang
    if error is not None:
        job.error = error
    level = "error" if target == FAILED else "info"
    add_event(
        db,
        job,
        message or f"Job {target.replace('_', ' ')}.",
        type="status",
        level=level,
        data={"from": current, "to": target},
        created_at=t,
    )
    return job
