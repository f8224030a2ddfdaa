"""The Celery app of the worker: thin tasks over plain functions, plus lifecycle hooks.

Start: celery -A worker.app worker -Q tuneq --pool threads --concurrency N   (N = job slots)
   or: python -m worker --slots N
"""

from __future__ import annotations

from typing import Any

from celery import signals
from sqlalchemy.exc import DBAPIError

from core.queue import REAP, RUN_JOB, make_celery
from core.settings import get_settings
from worker import gpus, host, kernel_warmup, kombu_fixes, reaper, runner, standby, template

app = make_celery()
kombu_fixes.install()  # a Redis restart must not stop the worker (see the module)

_reaper: reaper.ReaperThread | None = None
_host: host.HostThread | None = None


# A database that is down when the message arrives: try again later, with back-off, instead of
# losing the delivery (the dispatcher would re-send it too, but only once the DB is back).
@app.task(name=RUN_JOB, autoretry_for=(DBAPIError,), retry_backoff=True, retry_backoff_max=60,
          max_retries=get_settings().max_attempts)
def run_job(job_id: str) -> str:
    return runner.run_job(job_id)


@app.task(name=REAP)
def reap() -> list[str]:
    return reaper.reap_once()


@signals.celeryd_after_setup.connect
def _take_host_gpus(instance: Any = None, **_: Any) -> None:
    # On a CPU host the devices are job slots; one thread stays spare (see worker/__main__.py).
    threads = getattr(instance, "concurrency", None) or 1
    gpus.configure(gpus.GpuPool.for_host(get_settings(), slots=max(1, threads - 1)))


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    global _reaper, _host
    if _reaper is None:
        _reaper = reaper.ReaperThread()
        _reaper.start()
    if _host is None:
        settings = get_settings()
        pool = gpus.get_pool(settings)
        # The standbys and the template first: the host thread's first registration counts them (GET /readyz).
        standby.POOL.start(settings, pool)
        template.TEMPLATE.start(settings)
        kernel_warmup.KERNELS.start(settings, pool)
        _host = host.HostThread(pool, runner.default_worker_id(settings), slots=pool.count)
        _host.start()


@signals.worker_shutting_down.connect
def _stop_running_jobs(**_: Any) -> None:
    # Celery then waits for the tasks: each stops its trainer and hands its job back to the queue.
    runner.SHUTDOWN.set()
    standby.POOL.close()
    template.TEMPLATE.close()  # it ends once the running trainers it forked have
    kernel_warmup.KERNELS.close()
    if _reaper is not None:
        _reaper.stop()
    if _host is not None:
        _host.stop()
