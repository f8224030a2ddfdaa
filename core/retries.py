"""Infrastructure failures retry with a limit and exponential back-off; user errors never do.

The attempts are counted from `retry` events, so no column is needed and the event log shows
every one of them with its reason.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import states
from core.models import Job, JobEvent, now
from core.scheduling import RETRY_AT
from core.settings import get_settings

MAX_BACKOFF_S = 300.0
# Error codes of the trainer that a re-run cannot fix: the user must change data or settings.
USER_ERRORS = frozenset({"data", "config", "model", "oom", "invalid_spec"})


def retries_so_far(db: Session, job_id: str) -> int:
    return db.scalar(select(func.count()).where(JobEvent.job_id == job_id, JobEvent.type == "retry")) or 0


def backoff_s(retry: int) -> float:
    return min(MAX_BACKOFF_S, get_settings().retry_backoff_s * 2 ** (retry - 1))


def retry_or_fail(db: Session, job: Job, reason: str) -> bool:
    """Re-queue `job` (running or cancelling) after an infrastructure failure, or fail it when
    max_attempts runs are used up. Returns True when it was re-queued; the caller commits.
    """
    if job.status == states.CANCELLING:
        states.transition(db, job, states.CANCELLED, f"Job cancelled ({reason}).")
        return False
    retry = retries_so_far(db, job.id) + 1
    limit = get_settings().max_attempts
    if retry >= limit:
        message = f"{reason}; gave up after {limit} attempts"
        states.transition(db, job, states.FAILED, f"Job failed: {message}.",
                          error={"code": "infrastructure", "message": message, "param": None})
        return False
    delay = backoff_s(retry)
    job.progress = {**(job.progress or {}), RETRY_AT: now() + delay}
    states.add_event(db, job, f"{reason}; retry {retry} of {limit - 1} in {delay:.0f} s.", type="retry",
                     level="warning", data={"retry": retry, "max_attempts": limit, "delay_s": delay, "reason": reason})
    states.transition(db, job, states.QUEUED, f"Job re-queued after an infrastructure failure ({reason}).")
    return True
