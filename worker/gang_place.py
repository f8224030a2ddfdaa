"""Starting a job across hosts from this host (core/gang.py), and making room for one that waits
at the top of the queue by claiming hosts and pausing lower-priority jobs there (core/gang_claims.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import gang, gang_claims, workers
from core.models import GangClaim, Job, now
from core.scheduling import Waiting, queued_one
from core.settings import Settings
from worker.gpus import GpuPool, Reservation
from worker.preemption import preempt_for

log = logging.getLogger(__name__)

Led = tuple[Job, Reservation]
# A claim older than this many join timeouts is given up: the jobs it paused have long checkpointed.
CLAIM_STALE_JOINS = 2


def lead(db: Session, pool: GpuPool, w: Waiting, worker_id: str, followers: list[str] | None = None) -> Led | None:
    """Start a job across hosts from this host: reserve its GPUs here and, in one transaction,
    lease the job and reserve its other hosts (`followers`, else hosts whose GPUs are all free,
    core.gang). None, holding nothing, when too few hosts are free now or another worker won the
    job or a host first."""
    followers = followers if followers is not None else follower_hosts(db, pool.host, w)
    if followers is None:
        return None
    reservation = pool.reserve(w.gpus, owner=w.id)
    if reservation is None:
        return None
    job = gang.form(db, w.id, worker_id, pool.host, followers, w.gpus)
    if job is None:
        pool.release(reservation)
        return None
    log.info("job %s: leading it across hosts %s", job.id, [pool.host, *followers])
    return job, reservation


def follower_hosts(db: Session, here: str, w: Waiting) -> list[str] | None:
    """The other hosts a job across `w.nodes` hosts would take, by the registry: each with `w.gpus`
    GPUs free, large enough, with disk, in no gang and claimed by no job of `w`'s priority or
    higher; None when there are too few (or this host is in a gang already)."""
    busy = gang.busy_hosts(db) | set(db.scalars(select(GangClaim.host).where(
        GangClaim.job_id != w.id, GangClaim.priority >= w.priority)))
    db.rollback()
    if here in busy:
        return None
    fit = []
    for h in workers.hosts():
        memory = workers.gpu_memory_gib(h["gpu_info"])
        big_enough = w.min_gpu_memory_gib is None or memory is None or memory >= w.min_gpu_memory_gib
        if (h["host"] != here and h["host"] not in busy and min(h["gpus"], h["free"]) >= w.gpus
                and not h["disk_full"] and big_enough):
            fit.append(h["host"])
    return fit[: w.nodes - 1] if len(fit) >= w.nodes - 1 else None


def for_claim(db: Session, pool: GpuPool, c: gang_claims.Claim, worker_id: str,
              settings: Settings) -> Led | str:
    """This host is claimed for a queued job across hosts, and no job that outranks it and fits
    this host waits: it starts that job, led from here, once every claimed host has the GPUs
    free; meanwhile nothing.
    A claim that can no longer be met is given up (the job claims afresh)."""
    w = queued_one(db, c.job_id)
    hosts = {h["host"]: h for h in workers.hosts()}
    mine = gang_claims.claimed(db, c.job_id)
    # Held this long, a claim waits on something the registry and database do not show (a GPU an
    # inference server took, say): planned afresh, from what they show now.
    stale = now() - c.created_at > CLAIM_STALE_JOINS * settings.gang_join_timeout_s
    if w is None or stale or not gang_claims.still_room(db, w, hosts, mine):
        log.info("job %s: giving up its claim on hosts %s; they no longer make room for it", c.job_id, mine)
        gang_claims.release(db, c.job_id)
        db.commit()
        return "deferred"
    others = [h for h in mine if h != pool.host]
    if (free := pool.free()) < w.gpus:
        # What the claim asked to pause is counted as coming free; a job that started here just as
        # the claim was taken is not, and is paused now.
        preempt_for(db, pool, [w], free)
        return "deferred"
    if w.retry_at > now() or any(min(hosts[h]["free"], hosts[h]["gpus"]) < w.gpus for h in others):
        return "deferred"  # the claimed hosts drain to it
    return lead(db, pool, w, worker_id, others) or "deferred"


def make_room(db: Session, pool: GpuPool, queue: Iterable[Waiting], first: Waiting | None,
              worker_id: str) -> Led | str | None:
    """For the first job across hosts among the queue's highest priority that waits unclaimed and
    out of back-off: lead it from here if its hosts are free, else claim hosts for it and pause
    lower-priority jobs there. Returns the led job, `deferred` when this host was claimed (it
    starts nothing else now), or None (carry on)."""
    w = _top_gang(queue, first)
    if w is None or gang_claims.claimed(db, w.id):
        return None  # none waits, or its claimed hosts drain to it
    if (led := lead(db, pool, w, worker_id)) is not None:
        return led
    rooms = gang_claims.plan(db, w, workers.hosts())
    asked = gang_claims.claim(db, w, rooms) if rooms is not None else None
    if rooms is None or asked is None:
        return None
    hosts = [r.host for r in rooms]
    log.warning("job %s (priority %s): claimed hosts %s; preempting %s there", w.id, w.priority, hosts, asked)
    return "deferred" if pool.host in hosts else None


# How far into the queue's highest priority a job across hosts is looked for: the head the queue
# reads first (core.scheduling.PREFETCH), so a take never reads the whole queue for it.
SCAN = 32


def _top_gang(queue: Iterable[Waiting], first: Waiting | None) -> Waiting | None:
    """The first job across hosts, out of back-off, among the first SCAN jobs of the queue's
    highest priority: a job of lower priority never claims hosts ahead of the top's."""
    if first is None:
        return None
    t = now()
    for i, w in enumerate(queue):
        if i >= SCAN or w.priority < first.priority:
            return None
        if w.nodes > 1 and w.retry_at <= t:
            return w
    return None
