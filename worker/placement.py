"""Choosing what a delivery runs on this host's free GPUs, and preempting for a higher priority;
fitting a job to this host's GPUs, and moving it to larger ones when it runs out of memory here.

GPUs are reserved (lock files) before the job's lease is taken (DB), so a job is only ever
`running` while it holds its GPUs; a reservation whose lease is refused is given back at once.
"""

from __future__ import annotations

import logging
from itertools import takewhile

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import gang, gang_claims, states, workers
from core.jobs import acquire_lease
from core.models import Checkpoint, Job, now
from core.scheduling import Waiting, blocked_head, pick, reserve_for_passed_over, reserved_here, waiting
from core.settings import Settings
from trainer import planning
from worker import gang_place, reaper
from worker.disk import disk_state
from worker.gpus import GpuPool, Reservation
from worker.preemption import being_freed, local_holdings, preempt_for

log = logging.getLogger(__name__)


def _runnable(job: Job | None, ttl_s: float | None) -> bool:
    """Queued, or (ttl_s given) running under a lease older than ttl_s."""
    if job is None:
        return False
    if job.status == states.QUEUED:
        return True
    if ttl_s is None:
        return False
    stale = job.lease_heartbeat_at is None or job.lease_heartbeat_at < now() - ttl_s
    return job.status == states.RUNNING and stale


def take(db: Session, pool: GpuPool, job_id: str, worker_id: str, settings: Settings) -> tuple[Job, Reservation] | str:
    """A leased job with its GPUs reserved, or why not: `skipped` or `deferred`."""
    if disk_state(settings)["disk_full"]:
        # Another host takes it: the dispatcher re-sends a deferred job's message to all.
        log.warning("job %s deferred: less than %s GiB free for work on this host", job_id, settings.min_free_disk_gib)
        return "deferred"
    # A running job's lease is judged stale only once this process has seen the database up for
    # a whole TTL (worker.reaper): right after an outage every live lease looks old.
    takeover_ttl = settings.lease_ttl_s if reaper.WATCH.may_judge_leases(settings.lease_ttl_s) else None
    with pool.mutex:
        # Read under the mutex: a sibling slot of this worker may have just leased the job.
        job = db.get(Job, job_id, populate_existing=True)
        runnable = _runnable(job, takeover_ttl)
        db.rollback()
        if not runnable:
            return "skipped"
        assert job is not None
        if job.status == states.RUNNING:  # a dead worker's job, taken over before the reaper got to it
            if job.nodes > 1:
                return "skipped"  # the reaper re-queues it, which frees its other hosts too
            if not Waiting(job.id, job.gpus, job.priority, 0.0, min_gpu_memory_gib=job.min_gpu_memory_gib).fits(
                    pool.count, pool.count, pool.memory_gib):
                return "skipped"  # its plan needs larger GPUs: the reaper re-queues it for a host that has them
            target_id, gpus, priority = job.id, job.gpus, job.priority
        else:
            if gang.awaited_here(db, pool.host):
                # A job across hosts reserved this host's GPUs: a worker of it is joining (worker.gang).
                db.rollback()
                return "deferred"
            queue = waiting(db)
            db.rollback()
            first = next(iter(queue), None)  # the order's head: read without reading the whole queue
            claim = gang_claims.holder(db, pool.host)
            if claim is not None:  # only what outranks the claimer may start here meanwhile
                queue = list(takewhile(lambda w: w.priority > claim.priority, queue))
            if queue and (made := gang_place.make_room(db, pool, queue, first, worker_id)) is not None:
                return made
            if claim is not None and not any(w.fits(pool.count, pool.count, pool.memory_gib) for w in queue):
                # Claimed for a job across hosts, and nothing that outranks it could run here: it or nothing.
                return gang_place.for_claim(db, pool, claim, worker_id, settings)
            free = pool.free()
            held_for = (reserved_here(db, pool.host, pool.count, pool.memory_gib)
                        if settings.reserve_after_h > 0 else None)
            if held_for is not None and not (first is not None and first.priority > held_for.priority):
                # This host is reserved for a job that was passed over too long: it starts that
                # job once enough GPUs are free, and no other meanwhile.
                db.rollback()
                if held_for.retry_at > now() or not held_for.fits(free, pool.count, pool.memory_gib):
                    return "deferred"
                chosen = held_for
            else:
                chosen = pick(queue, free, pool.count, memory_gib=pool.memory_gib)
            tried: set[str] = set()
            while chosen is not None and chosen.nodes > 1:
                if (led := gang_place.lead(db, pool, chosen, worker_id)) is not None:
                    return led
                if chosen is held_for:
                    return "deferred"  # held for it: the host waits until its other hosts are free too
                tried.add(chosen.id)  # its other hosts are not free now: the next job that fits goes first
                chosen = pick([w for w in queue if w.id not in tried], free, pool.count, memory_gib=pool.memory_gib)
            if chosen is None:
                # A job across hosts makes room through claims on all its hosts (make_room).
                preempt_for(db, pool, (w for w in queue if w.nodes == 1), free)
                return "deferred"
            # Only a job that outranks `chosen` matters here; the order's head has the highest
            # priority, so when it does not outrank, the queue need not be read further.
            outranked = first is not None and first.priority > chosen.priority
            head = blocked_head(queue, free, pool.count, memory_gib=pool.memory_gib) if outranked else None
            if (head is not None and chosen.id != head.id and chosen.priority < head.priority
                    and being_freed(*local_holdings(db, pool)) > 0):
                # GPUs are being given back for a higher-priority job that needs more than are free:
                # backfilling the ones already free (e.g. with the job just preempted) would undo
                # its preemption, and a multi-GPU head would never find all its GPUs free at once.
                db.rollback()
                return "deferred"
            if held_for is None and reserve_for_passed_over(
                    db, queue, chosen, free, pool.count, pool.memory_gib, pool.host, now(),
                    settings.reserve_after_h, settings.lease_ttl_s) is not None:
                return "deferred"  # this host is now reserved for a job ahead of `chosen`: it drains
            target_id, gpus, priority = chosen.id, chosen.gpus, chosen.priority
            if target_id != job_id:
                log.info("job %s waits behind job %s, which fits the free GPUs and runs first", job_id, target_id)
        reservation = pool.reserve(gpus, owner=target_id)
        if reservation is None:  # another worker process of this host was faster
            return "deferred"
        if gang.awaited_here(db, pool.host) or ((c := gang_claims.holder(db, pool.host)) is not None
                                                 and c.priority >= priority):
            # A job across hosts reserved or claimed this host while it chose: its GPUs go to that job.
            db.rollback()
            pool.release(reservation)
            return "deferred"
        leased = acquire_lease(db, target_id, worker_id, takeover_ttl, host=pool.host)
        if leased is None:
            pool.release(reservation)
            return "skipped" if target_id == job_id else "deferred"
        return leased, reservation


def fit_to_host(db: Session, job: Job, pool: GpuPool) -> str | None:
    """Record the GPUs the job runs on; the caller commits. On a start from scratch, a batch_size
    "auto" becomes the largest that fits this host's GPUs (the API picked it for the largest
    registered GPU), never more than the API's pick. A job that resumes keeps the batch its
    checkpoints were written with. Returns what changed, for the job's events, or None.
    """
    memory = pool.memory_gib
    if not pool.gpu_info or memory is None:
        return None
    job.gpu = {"name": pool.gpu_info[0].get("name"), "memory_gib": memory, "count": job.gpus}
    plan = job.plan or {}
    # A job across hosts keeps its batch: every host's ranks must agree on it.
    if plan.get("requested_batch_size") != "auto" or not plan.get("checked") or job.nodes > 1:
        return None
    if db.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job.id).limit(1)) is not None:
        return None
    config = planning.local_config(job.spec["model"])
    if config is None:
        return None
    hp = job.spec["hyperparameters"]
    admitted = int(plan.get("admitted_batch_size") or hp["batch_size"])
    try:
        here = planning.plan({**job.spec, "hyperparameters": {**hp, "batch_size": "auto"}}, config,
                             int(memory * planning.GiB), gpus=max(1, job.gpus)).methods.get(job.spec["method"])
    except ValueError:
        return None
    if here is None or here.batch_size is None:
        return None  # not even batch 1 fits by the plan: it runs as admitted, and an OOM moves it up
    batch = min(here.batch_size, admitted)
    job.plan = {**plan, "admitted_batch_size": admitted}
    if batch == hp["batch_size"]:
        return None
    job.spec = {**job.spec, "hyperparameters": {**hp, "batch_size": batch}}
    return f"batch_size {batch} on this host's {memory:g} GiB GPUs (batch_size 'auto'; {admitted} on the largest)"


def larger_gpus(job: Job, pool: GpuPool) -> float | None:
    """GiB of the next larger GPU than this host's on a registered host with enough GPUs for the
    job; None when there is none (or this host's memory is unknown)."""
    memory = pool.memory_gib
    if memory is None:
        return None
    sizes = [m for h in workers.hosts() if h["gpus"] >= job.gpus
             and (m := workers.gpu_memory_gib(h["gpu_info"])) is not None and m > memory]
    return min(sizes) if sizes else None
