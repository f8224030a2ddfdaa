"""Preempting on this host for a higher-priority waiting job: the lowest-priority jobs whose GPUs
make room for it, counting GPUs already being given back."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import control, policy, states
from core.inference import SERVER_OWNER
from core.models import Job
from core.scheduling import Waiting, blocked_head
from worker.gpus import GpuPool

log = logging.getLogger(__name__)


def local_holdings(db: Session, pool: GpuPool) -> tuple[dict[str, int], list[Job]]:
    """GPUs locked per job on this host, and which of those jobs are running."""
    held: dict[str, int] = {}
    for owner in pool.holders().values():
        if owner.startswith(SERVER_OWNER):
            continue  # an inference server's GPU: held for good, neither a job's nor coming free
        held[owner] = held.get(owner, 0) + 1
    running = list(db.scalars(select(Job).where(Job.id.in_(held), Job.status == states.RUNNING))) if held else []
    return held, running


def being_freed(held: dict[str, int], running: list[Job]) -> int:
    """Locked GPUs about to come free: their job was asked to pause, or is no longer running but
    its worker has not unlocked them yet (a paused job is queued again before its GPUs unlock)."""
    running_ids = {j.id for j in running}
    return (sum(n for owner, n in held.items() if owner not in running_ids)
            + sum(held[j.id] for j in running if j.pause_requested))


def preempt_for(db: Session, pool: GpuPool, queue: Iterable[Waiting], free: int) -> list[str]:
    """Pause the lowest-priority jobs on this host when that frees enough GPUs for a
    higher-priority waiting job; return the ids asked to pause."""
    head = blocked_head(queue, free, pool.count, memory_gib=pool.memory_gib)
    if head is None:
        return []
    held, running = local_holdings(db, pool)
    if not held:
        return []
    # GPUs already being given back count as free: preempting another job for them would pause two.
    need = head.gpus - free - being_freed(held, running)
    for_job = db.get(Job, head.id)
    owner = for_job.owner_id if for_job is not None else None
    victims = sorted((j for j in running if not j.pause_requested and j.priority < head.priority
                      and policy.may_preempt(db, head.priority, owner, j.owner_id)),
                     key=lambda j: (j.priority, -(j.started_at or 0)))
    chosen = []
    for v in victims:
        if need <= 0:
            break
        chosen.append(v)
        need -= held[v.id]
    if need > 0 or not chosen:
        db.rollback()
        return []
    asked = [v.id for v in chosen if for_job is not None and control.preempt(db, v, for_job)]
    if asked:
        log.warning("preempting %s for job %s (priority %s)", asked, head.id, head.priority)
    return asked


def coming_free(db: Session, pool: GpuPool, job: Job, gpus: int) -> bool:
    """Whether `gpus` of this host come free for `job`, a job across hosts whose part here waits
    for them: GPUs being given back count (an earlier attempt's of this job too), and jobs here of
    lower priority are asked to pause for it now. False: a job that keeps running holds them (one
    this host's worker started as the gang formed), and waiting out the join timeout is in vain."""
    free = pool.free()
    if free >= gpus:
        return True
    w = Waiting(job.id, gpus, job.priority, 0.0, owner=job.owner_id or "", min_gpu_memory_gib=job.min_gpu_memory_gib)
    preempt_for(db, pool, [w], free)
    held, running = local_holdings(db, pool)
    db.rollback()
    # Its own locks (not counted as running) are an earlier attempt's part, being given back.
    return free + being_freed(held, [j for j in running if j.id != job.id]) >= gpus
