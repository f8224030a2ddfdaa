"""Which queued job runs next: highest priority first, then fair share (core/fairshare.py: the
least-used team, then user; FIFO within a user); a job in retry back-off waits.

One ordering serves the queue position a user sees, the worker's choice of what to run on free
GPUs, and the dispatcher's re-sending of queued jobs, so all three agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import fairshare, states
from core.models import Job, User, now
from core.settings import get_settings

RETRY_AT = "retry_not_before"  # job.progress key: the back-off of an infrastructure retry


@dataclass(frozen=True)
class Waiting:
    id: str
    gpus: int
    priority: int
    retry_at: float
    owner: str = ""
    team: str = ""
    created_at: float = 0.0


def waiting(db: Session, t: float | None = None) -> list[Waiting]:
    """Queued jobs in the order they run: three queries whatever the queue's length."""
    s = get_settings()
    rows = db.execute(
        select(Job.id, Job.gpus, Job.priority, Job.progress, Job.owner_id, Job.created_at, User.team_id)
        .outerjoin(User, User.id == Job.owner_id)
        .where(Job.status == states.QUEUED)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    ).all()
    queue = [Waiting(r.id, r.gpus, r.priority, float((r.progress or {}).get(RETRY_AT) or 0),
                     r.owner_id or "", fairshare.team_key(r.team_id, r.owner_id), r.created_at) for r in rows]
    if not s.fair_share or not queue:
        return queue
    return fairshare.order(queue, fairshare.usage_now(db, now() if t is None else t), s.fair_share_job_gpu_hours)


def queue_position(db: Session, job: Job) -> int | None:
    """1 for the next job to run; None when the job is not queued."""
    if job.status != states.QUEUED:
        return None
    ids = [w.id for w in waiting(db)]
    return ids.index(job.id) + 1 if job.id in ids else None


def pick(queue: list[Waiting], free: int, total: int, t: float | None = None) -> Waiting | None:
    """The first job in queue order that fits `free` GPUs of a host with `total`.

    Skipping a head job that does not fit now (backfill) keeps GPUs busy; the head job gets its
    GPUs through preemption when it outranks what runs (core.control.preempt).
    """
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and w.gpus <= min(free, total):
            return w
    return None


def blocked_head(queue: list[Waiting], free: int, total: int, t: float | None = None) -> Waiting | None:
    """The first job that could run on this host but not with its free GPUs now."""
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and free < w.gpus <= total:
            return w
    return None
