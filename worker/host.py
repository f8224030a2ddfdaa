"""The worker's background duties on its host: stay registered, re-send queued jobs, kill orphans.

The broker holds only hints: a message lost with a restarted Redis, a job re-queued after a
retry's back-off or a preemption, a job deferred because its GPUs were taken, all need a new
message. The database knows which jobs are queued, so every worker re-sends them (one of them
wins each job's pending marker), in queue order and no more than the cluster's devices.
"""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy import select

from core import states, workers
from core.db import session_scope
from core.models import Job, now
from core.queue import RUN_JOB, claim_dispatch, producer
from core.scheduling import waiting
from core.settings import get_settings
from worker.disk import disk_state, sweep_work_dirs
from worker.gang import Follow
from worker.gpus import GpuPool
from worker import kernel_warmup, standby, template
from worker.process import kill_orphans
from worker.runner import SHUTDOWN

log = logging.getLogger(__name__)

ORPHAN_SCAN_S = 5.0
SWEEP_S = 60.0


def dispatch_once() -> list[str]:
    """Send a run_job message for queued jobs that have none in flight; return their ids."""
    with session_scope() as db:
        queue = waiting(db)
    if not queue:
        return []
    cap = max(1, workers.total_devices())
    t, sent, considered = now(), [], 0
    for w in queue:
        if considered >= cap:
            break
        if w.retry_at > t:
            continue
        considered += 1
        if claim_dispatch(w.id):
            # A worker may have leased the job (and cleared its marker) since `waiting` read it.
            with session_scope() as db:
                still_queued = db.scalar(select(Job.status).where(Job.id == w.id)) == states.QUEUED
            if not still_queued:
                continue
            producer().send_task(RUN_JOB, args=[w.id])
            log.info("job %s is queued with no message in flight; sent one", w.id)
            sent.append(w.id)
    return sent


class HostThread(threading.Thread):
    def __init__(self, pool: GpuPool, worker_id: str, slots: int):
        super().__init__(name="tuneq-host", daemon=True)
        self.pool, self.worker_id, self.slots = pool, worker_id, slots
        self.stopped = threading.Event()
        self.wake = threading.Event()
        # Jobs across hosts that reserved this host: each gets a thread that runs its ranks here.
        self.follow = Follow(pool, worker_id, get_settings(), SHUTDOWN)

    def register(self) -> None:
        s = get_settings()
        workers.register(self.worker_id, self.pool.host, self.pool.count, self.pool.kind, s.registry_ttl_s,
                         slots=self.slots, free=self.pool.free(), seen=time.time(), gpu_info=self.pool.gpu_info,
                         standby=standby.POOL.state(), template=template.TEMPLATE.state(),
                         kernels=kernel_warmup.KERNELS.state(), **disk_state(s))

    def run(self) -> None:
        s = get_settings()
        next_orphan_scan = next_sweep = 0.0
        while not self.stopped.is_set():
            for duty in (self.register, dispatch_once, self.follow):
                try:
                    duty()
                except Exception:  # a DB or Redis outage must not end the thread; the next pass retries
                    log.warning("%s failed; retrying", getattr(duty, "__name__", duty), exc_info=True)
            if time.monotonic() >= next_orphan_scan:
                if killed := kill_orphans():
                    log.warning("killed orphaned trainer process groups %s", killed)
                next_orphan_scan = time.monotonic() + ORPHAN_SCAN_S
            if time.monotonic() >= next_sweep:
                try:
                    with session_scope() as db:
                        sweep_work_dirs(db, s, self.pool.host, set(self.pool.holders().values()))
                except Exception:  # noqa: BLE001 - a later pass sweeps again
                    log.warning("sweeping work directories failed", exc_info=True)
                next_sweep = time.monotonic() + SWEEP_S
            self.wake.wait(s.dispatch_interval_s)
            self.wake.clear()

    def stop(self) -> None:
        self.stopped.set()
        self.wake.set()
        try:
            workers.unregister(self.worker_id)
        except Exception:  # noqa: BLE001 - the key expires anyway
            pass
