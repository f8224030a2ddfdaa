"""Per-user limits of a shared service: unfinished jobs, GPUs asked for, job creation rate.

Quota checks run inside the transaction that inserts the job, after locking the user's row
(PostgreSQL), so two requests of one user cannot both pass the last free slot. The rate limit is a
fixed-window counter in Redis, shared by every API process.
"""

from __future__ import annotations

import time
from functools import lru_cache

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import states
from core.models import Job, User
from core.settings import Settings, get_settings

# Paused jobs hold no GPU but still count as the user's jobs: they come back.
ACTIVE = (states.VALIDATING, states.QUEUED, states.RUNNING, states.CANCELLING, states.PAUSED)
HOLDING_GPUS = (states.VALIDATING, states.QUEUED, states.RUNNING, states.CANCELLING)


class LimitExceeded(Exception):
    """A request over a limit; `retry_after` (seconds) when waiting alone will cure it."""

    def __init__(self, message: str, code: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.code = code
        self.param = param
        self.retry_after = retry_after


def check_job_quota(db: Session, user: User, gpus: int, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    if gpus > settings.max_gpus_per_user:
        raise LimitExceeded(
            f"gpus: {gpus} is more than the {settings.max_gpus_per_user} GPUs a user may use (TUNEQ_MAX_GPUS_PER_USER)",
            "gpu_limit", "gpus",
        )
    # Serialises one user's job creations on PostgreSQL; SQLite serialises all writers anyway.
    db.execute(select(User.id).where(User.id == user.id).with_for_update())
    active, used = db.execute(
        select(func.count(Job.id), func.coalesce(func.sum(Job.gpus).filter(Job.status.in_(HOLDING_GPUS)), 0))
        .where(Job.owner_id == user.id, Job.status.in_(ACTIVE))
    ).one()
    if active >= settings.max_active_jobs_per_user:
        raise LimitExceeded(
            f"you have {active} unfinished jobs, the most a user may have (TUNEQ_MAX_ACTIVE_JOBS_PER_USER="
            f"{settings.max_active_jobs_per_user}); wait for one to finish or cancel one",
            "active_job_limit",
        )
    if used + gpus > settings.max_gpus_per_user:
        raise LimitExceeded(
            f"gpus: your unfinished jobs ask for {used} GPUs; {gpus} more would exceed the "
            f"{settings.max_gpus_per_user} a user may use (TUNEQ_MAX_GPUS_PER_USER)",
            "gpu_limit", "gpus",
        )


@lru_cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


def take_job_slot(user_id: str, settings: Settings | None = None) -> None:
    """Count one job creation against the user's rate; LimitExceeded with Retry-After when over."""
    settings = settings or get_settings()
    window = settings.job_create_window_s
    bucket = int(time.time() // window)
    key = f"tuneq:rate:create_job:{user_id}:{bucket}"
    client = _redis(settings.redis_url)
    pipe = client.pipeline()
    pipe.incr(key)
    pipe.expire(key, window + 5)
    count = pipe.execute()[0]
    if count > settings.job_create_rate:
        retry_after = max(1, int((bucket + 1) * window - time.time()) + 1)
        raise LimitExceeded(
            f"you created {settings.job_create_rate} jobs in the last {window} s, the most allowed "
            f"(TUNEQ_JOB_CREATE_RATE); try again in {retry_after} s",
            "rate_limited", retry_after=retry_after,
        )
