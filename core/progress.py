"""What a job's `progress` shows: how far it is, how fast it goes, when it ends, where it waits.

The worker folds every trainer event into `job.progress` as it stores it; the figures of the
latest `metrics` event (step, loss, speed, memory, MFU) are read back from that event here, so a
field the trainer gains shows up without a worker change, and the ETA is aged to the time of the
request instead of frozen at the time of the event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.models import Job, JobEvent, now
from core.scheduling import queue_position

# The keys every job's progress carries (null when not known yet), in the order clients show them.
FIELDS = ("step", "total_steps", "epoch", "train_loss", "tokens_per_second", "peak_memory_bytes", "mfu",
          "eta_seconds", "queue_position", "updated_at")
# Figures copied from the latest metrics event as the trainer wrote them.
FROM_METRICS = ("step", "total_steps", "epoch", "train_loss", "tokens_per_second", "peak_memory_bytes", "mfu")
# Statuses in which a metrics event can exist and is worth reading.
TRAINED = frozenset({states.RUNNING, states.CANCELLING, states.PAUSED, *states.TERMINAL})


def latest_metrics(db: Session, job_id: str) -> JobEvent | None:
    # Walks the (job_id, seq) index from the newest event: metrics are most of a job's events.
    return db.scalar(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        .order_by(JobEvent.seq.desc()).limit(1)
    )


def latest_metrics_of(db: Session, job_ids: list[str]) -> dict[str, JobEvent | None]:
    """latest_metrics of several jobs in one query (a page of jobs); each job's latest is found
    as latest_metrics finds it, from its newest event down the (job_id, seq) index."""
    found: dict[str, JobEvent | None] = dict.fromkeys(job_ids)
    if not job_ids:
        return found
    newest = (select(JobEvent.seq).where(JobEvent.job_id == Job.id, JobEvent.type == "metrics")
              .order_by(JobEvent.seq.desc()).limit(1).correlate(Job).scalar_subquery())
    seqs = select(newest).select_from(Job).where(Job.id.in_(job_ids))
    for event in db.scalars(select(JobEvent).where(JobEvent.seq.in_(seqs))):
        found[event.job_id] = event
    return found


def job_progress(db: Session | None, job: Job, at: float | None = None,
                 positions: Mapping[str, int] | None = None,
                 metrics: Mapping[str, JobEvent | None] | None = None) -> dict[str, Any]:
    """The job's progress with every key of FIELDS, plus what the worker keeps there
    (`retry_not_before`, ...) and `preempted_by` from its column. Without a session, only what
    the row holds. `positions` (core.scheduling.shown_positions, read once for a page of jobs)
    gives the queue position instead of a reading of the queue per job, and `metrics`
    (latest_metrics_of) the latest metrics event instead of a query per job."""
    stored = dict(job.progress or {})
    progress: dict[str, Any] = {k: stored.get(k) for k in FIELDS} | stored
    if job.preempted_by:
        progress["preempted_by"] = job.preempted_by
    event = None
    if job.status in TRAINED:
        if metrics is not None and job.id in metrics:
            event = metrics[job.id]
        elif db is not None:
            event = latest_metrics(db, job.id)
    if event is not None:
        data = event.data or {}
        progress.update({k: data[k] for k in FROM_METRICS if data.get(k) is not None})
        progress["updated_at"] = event.created_at
    t = at if at is not None else now()
    progress["eta_seconds"] = eta = _eta(job, stored.get("eta_seconds"), progress.get("updated_at"), t)
    # OpenAI's `estimated_finish` of the job object, as a unix time.
    progress["estimated_finish"] = t + eta if eta is not None and job.status == states.RUNNING else None
    progress["queue_position"] = _position(db, job, positions)
    return progress


def _position(db: Session | None, job: Job, positions: Mapping[str, int] | None) -> int | None:
    if job.status != states.QUEUED:
        return None
    if positions is not None:
        return positions.get(job.id)
    return queue_position(db, job) if db is not None else None


def _eta(job: Job, eta: Any, measured_at: Any, at: float) -> float | None:
    """Seconds left: the worker's estimate at the latest metrics event, less the time since."""
    if job.status == states.SUCCEEDED:
        return 0.0
    if job.status != states.RUNNING or not isinstance(eta, int | float):
        return None
    elapsed = at - measured_at if isinstance(measured_at, int | float) else 0.0
    return round(max(0.0, eta - max(0.0, elapsed)), 1)
