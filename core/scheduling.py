"""Which queued job runs next: highest priority first, then oldest; a job in retry back-off waits.

One ordering serves the queue position a user sees, the worker's choice of what to run on free
GPUs, and the dispatcher's re-sending of queued jobs, so all three agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.models import Job, now

RETRY_AT = "retry_not_before"  # job.progress key: the back-off of an infrastructure retry


@dataclass(frozen=True)
class Waiting:
    id: str
    gpus: int
    priority: int
    retry_at: float
    min_gpu_memory_gib: float | None = None  # the least GPU memory its plan fits in (Job.min_gpu_memory_gib)

    def fits(self, free: int, total: int, memory_gib: float | None) -> bool:
        """Fits `free` GPUs of a host with `total`, each of `memory_gib` (None: not known, not checked)."""
        big_enough = memory_gib is None or self.min_gpu_memory_gib is None or self.min_gpu_memory_gib <= memory_gib
        return self.gpus <= min(free, total) and big_enough


def waiting(db: Session) -> list[Waiting]:
    rows = db.execute(
        select(Job.id, Job.gpus, Job.priority, Job.progress, Job.min_gpu_memory_gib)
        .where(Job.status == states.QUEUED)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
    ).all()
    return [Waiting(r.id, r.gpus, r.priority, float((r.progress or {}).get(RETRY_AT) or 0),
                    min_gpu_memory_gib=r.min_gpu_memory_gib) for r in rows]


def queue_position(db: Session, job: Job) -> int | None:
    """1 for the next job to run; None when the job is not queued."""
    if job.status != states.QUEUED:
        return None
    ids = [w.id for w in waiting(db)]
    return ids.index(job.id) + 1 if job.id in ids else None


def pick(queue: list[Waiting], free: int, total: int, t: float | None = None,
         memory_gib: float | None = None) -> Waiting | None:
    """The first job in queue order that fits `free` GPUs of a host with `total`, of `memory_gib` each.

    Skipping a head job that does not fit now (backfill) keeps GPUs busy; the head job gets its
    GPUs through preemption when it outranks what runs (core.control.preempt). A job whose plan
    needs more memory than this host's GPUs have is left to a larger host.
    """
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and w.fits(free, total, memory_gib):
            return w
    return None


def blocked_head(queue: list[Waiting], free: int, total: int, t: float | None = None,
                 memory_gib: float | None = None) -> Waiting | None:
    """The first job that could run on this host but not with its free GPUs now."""
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and free < w.gpus and w.fits(total, total, memory_gib):
            return w
    return None
