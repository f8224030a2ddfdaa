"""Per-user limits of a shared service: unfinished jobs, GPUs asked for, job creation rate.

Quota checks run inside the transaction that inserts the job (or queues a paused one again),
after locking the user's row (PostgreSQL; on SQLite the database's write lock), so two requests
of one user cannot both pass the last free slot. The rate limit is a sliding window in Redis, shared by every API process, that
counts only creations that were accepted.
"""

from __future__ import annotations

import math
import secrets
import time
from functools import lru_cache

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core import states
from core.identity import DELETED
from core.models import File, Job, User
from core.settings import Settings, get_settings
from trainer.vocabulary import extra_files

# Paused jobs hold no GPU but still count as the user's jobs: they come back.
ACTIVE = (states.VALIDATING, states.QUEUED, states.RUNNING, states.CANCELLING, states.PAUSED)
HOLDING_GPUS = (states.VALIDATING, states.QUEUED, states.RUNNING, states.CANCELLING)


class LimitExceeded(Exception):
    """A request over a limit; `retry_after` (seconds) when waiting alone will cure it.

    A quota (403) is refused until the user frees something; only the rate limit (429) is
    cured by waiting, so only it carries Retry-After.
    """

    def __init__(self, message: str, code: str, param: str | None = None, retry_after: int | None = None,
                 status: int = 403):
        super().__init__(message)
        self.code = code
        self.param = param
        self.retry_after = retry_after
        self.status = status


def lock_user(db: Session, user_id: str) -> None:
    """Serialise one user's quota check and insert until the transaction ends.

    A no-op UPDATE takes the user's row lock on PostgreSQL and the database's write lock on
    SQLite, whose driver would otherwise run the quota's SELECT outside any transaction, so two
    requests could both count the same free slot.
    """
    db.execute(update(User).where(User.id == user_id).values(name=User.name))


def lock_files(db: Session, file_ids: set[str]) -> None:
    """Serialise a job's creation with the deletion of any file it reads, until the transaction ends.

    Both sides lock the file rows themselves: the creator and the file's owner may be different
    users (an admin trains on a member's file), so neither user's lock covers both. The rows are
    locked one by one in id order, so two creations naming the same files cannot deadlock.
    """
    for file_id in sorted(file_ids):
        db.execute(update(File).where(File.id == file_id).values(status=File.status))


def check_gpus_allowed(gpus: int, settings: Settings | None = None, nodes: int = 1) -> None:
    """A job asking for more GPUs (gpus on each of its nodes) than a user may ever hold: refused
    before any other work."""
    settings = settings or get_settings()
    if gpus * nodes > settings.max_gpus_per_user:
        asked = f"{gpus} GPUs on each of {nodes} nodes" if nodes > 1 else str(gpus)
        raise LimitExceeded(
            f"gpus: {asked} is more than the {settings.max_gpus_per_user} GPUs a user may use (TUNEQ_MAX_GPUS_PER_USER)",
            "gpu_limit", "gpus",
        )


def planned_gpu_hours(plan: dict | None) -> float | None:
    """The planner's GPU-hour estimate of a job's plan; None when it had no token count to go on."""
    compute = (plan or {}).get("compute")
    hours = compute.get("gpu_hours") if isinstance(compute, dict) else None
    return float(hours) if isinstance(hours, int | float) else None


def check_job_quota(db: Session, user: User, gpus: int, settings: Settings | None = None,
                    gpu_hours: float | None = None, *, besides: str | None = None) -> None:
    """Unfinished jobs, GPUs and planned GPU-hours of the user, counted under the user's lock.

    `besides`: the id of a job that exists already and asks to hold GPUs again (a paused one
    resuming); it is left out of the count, so it is counted once, as the job asking.
    """
    settings = settings or get_settings()
    check_gpus_allowed(gpus, settings)
    lock_user(db, user.id)
    mine = [Job.owner_id == user.id, Job.status.in_(ACTIVE)]
    if besides is not None:
        mine.append(Job.id != besides)
    rows = db.execute(select(Job.status, Job.gpus, Job.plan, Job.spec).where(*mine)).all()
    active = len(rows)
    # A job across hosts holds its gpus on each of its nodes.
    used = sum(g * int((spec or {}).get("nodes") or 1) for status, g, _, spec in rows if status in HOLDING_GPUS)
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
    if gpu_hours is not None:
        booked = sum(planned_gpu_hours(plan) or 0.0 for _, _, plan, _ in rows)
        if booked + gpu_hours > settings.max_gpu_hours_per_user:
            raise LimitExceeded(
                f"hyperparameters: the planner estimates this job at {gpu_hours:.3g} GPU-hours and your unfinished "
                f"jobs at {booked:.3g}; together more than the {settings.max_gpu_hours_per_user:g} a user may book "
                "(TUNEQ_MAX_GPU_HOURS_PER_USER); lower max_steps or n_epochs, or wait for a job to finish",
                "gpu_hour_budget", "hyperparameters",
            )


def check_resume_quota(db: Session, job: Job, settings: Settings | None = None) -> None:
    """The quotas of a creation, for a paused job about to be queued again.

    A paused job holds no GPUs (HOLDING_GPUS), so its owner may use them meanwhile; resuming asks
    for them again and is checked as creating the job was, under the same lock.
    """
    owner = db.get(User, job.owner_id) if job.owner_id is not None else None
    if owner is None:
        return  # a job without an owner counts against no user's quota
    check_job_quota(db, owner, job.total_gpus, settings, planned_gpu_hours(job.plan), besides=job.id)


@lru_cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


# A sliding window of the user's accepted creations (a sorted set scored by time): drop those
# older than the window, then take a slot if fewer than the rate remain. One script, so
# concurrent requests cannot both take the last slot. Returns {1, 0} or {0, oldest score}.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return {0, redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 5000)
return {1, 0}
"""


def _rate_key(user_id: str) -> str:
    return f"tuneq:rate:create_job:{user_id}"


def take_job_slot(user_id: str, settings: Settings | None = None, now: float | None = None) -> str:
    """Count one job creation against the user's rate; its slot id, or LimitExceeded with Retry-After.

    Release the slot (release_job_slot) when the creation is then refused: only accepted work counts.
    """
    settings = settings or get_settings()
    window_ms = settings.job_create_window_s * 1000
    now_ms = int((time.time() if now is None else now) * 1000)
    slot = f"{now_ms}:{secrets.token_hex(6)}"
    # A registered script runs by its sha (EVALSHA), loaded again by redis-py after a restart.
    take = _redis(settings.redis_url).register_script(_TAKE)
    taken, oldest = take(keys=[_rate_key(user_id)], args=[now_ms, window_ms, settings.job_create_rate, slot])
    if not taken:
        retry_after = max(1, math.ceil((int(float(oldest)) + window_ms - now_ms) / 1000))
        raise LimitExceeded(
            f"you created {settings.job_create_rate} jobs in the last {settings.job_create_window_s} s, the most "
            f"allowed (TUNEQ_JOB_CREATE_RATE); try again in {retry_after} s",
            "rate_limited", retry_after=retry_after, status=429,
        )
    return slot


def release_job_slot(user_id: str, slot: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    _redis(settings.redis_url).zrem(_rate_key(user_id), slot)


def check_file_quota(db: Session, user: User, size: int, settings: Settings | None = None, *, lock: bool = True) -> None:
    """Refuse an upload of `size` bytes past the user's file count or byte quota.

    lock=False is the quick check before the upload is stored; the one that counts runs under
    the user's lock, in the transaction that inserts the file.
    """
    settings = settings or get_settings()
    if lock:
        lock_user(db, user.id)
    count, used = db.execute(
        select(func.count(File.id), func.coalesce(func.sum(File.bytes), 0))
        .where(File.owner_id == user.id, File.status != DELETED)
    ).one()
    if count + 1 > settings.max_files_per_user:
        raise LimitExceeded(
            f"file: you have {count} files, the most a user may keep (TUNEQ_MAX_FILES_PER_USER="
            f"{settings.max_files_per_user}); delete some with DELETE /v1/files/{{id}}", "file_count_limit", "file",
        )
    if used + size > settings.max_file_bytes_per_user:
        raise LimitExceeded(
            f"file: your files hold {used} bytes; {size} more would exceed the {settings.max_file_bytes_per_user} "
            "a user may store (TUNEQ_MAX_FILE_BYTES_PER_USER); delete some with DELETE /v1/files/{id}",
            "file_bytes_limit", "file",
        )


def job_file_ids(training: str | None, validation: str | None, spec: dict | None) -> set[str]:
    """Every file a job reads: training and validation data, mix, forgetting and eval files."""
    named = {training, validation} | {file_id for _, file_id, _ in extra_files(spec or {})}
    return {f for f in named if isinstance(f, str)}


def jobs_using_file(db: Session, file_id: str) -> list[str]:
    """Ids of unfinished jobs that read the file."""
    rows = db.execute(select(Job.id, Job.training_file, Job.validation_file, Job.spec).where(Job.status.in_(ACTIVE))).all()
    return [job_id for job_id, training, validation, spec in rows if file_id in job_file_ids(training, validation, spec)]


def deleted_files(db: Session, file_ids: set[str]) -> list[str]:
    """Those of `file_ids` deleted meanwhile; asked under the files' locks (lock_files), which DELETE takes too."""
    return list(db.scalars(select(File.id).where(File.id.in_(file_ids), File.status == DELETED)))
