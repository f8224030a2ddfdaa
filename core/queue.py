"""The Celery app's configuration and the producer side of the queue.

Both the API (producer) and the worker (consumer) build their app here, so the reliability
settings (docs/architecture.md) are written once. Tasks are sent by name: the API never imports worker/.
"""

from __future__ import annotations

from functools import lru_cache

import redis
from celery import Celery

from core.settings import get_settings

RUN_JOB = "tuneq.run_job"
REAP = "tuneq.reap"


def make_celery(broker_url: str | None = None) -> Celery:
    settings = get_settings()
    app = Celery("tuneq", broker=broker_url or settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_default_queue="tuneq",
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def producer() -> Celery:
    return make_celery()


# A job whose message is in the broker carries this key; the dispatcher re-sends queued jobs
# without one, so a message lost with Redis (or never sent) cannot strand a job.
PENDING = "tuneq:pending:"
PENDING_TTL_S = 30


def enqueue_job(job_id: str) -> None:
    """Hand a job id to the workers. Call only after the job row is committed."""
    from core import workers

    try:
        workers.client().set(PENDING + job_id, "1", ex=PENDING_TTL_S)
    except redis.RedisError:
        pass  # send_task below reports the broker's state; the marker is only an optimisation
    producer().send_task(RUN_JOB, args=[job_id])


def claim_dispatch(job_id: str) -> bool:
    """True for the one dispatcher that should re-send this job now."""
    from core import workers

    return bool(workers.client().set(PENDING + job_id, "1", nx=True, ex=PENDING_TTL_S))


def clear_pending(job_id: str) -> None:
    """The message was taken: a job still queued afterwards needs a new one."""
    from core import workers

    try:
        workers.client().delete(PENDING + job_id)
    except redis.RedisError:
        pass
