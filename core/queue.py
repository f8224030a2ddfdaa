"""The Celery app's configuration and the producer side of the queue.

Both the API (producer) and the worker (consumer) build their app here, so the reliability
settings of DESIGN.md are written once. Tasks are sent by name: the API never imports worker/.
"""

from __future__ import annotations

from functools import lru_cache

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


def enqueue_job(job_id: str) -> None:
    """Hand a job id to the workers. Call only after the job row is committed."""
    producer().send_task(RUN_JOB, args=[job_id])
