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
from core.scheduling import Waiting, blocked, hold_host, release_host
from core.settings import get_settings
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


# Jobs of the head's priority read past the head for one that may preempt here: enough for a few
# teams' heads, and the queue is not read to its end on every decision.
CANDIDATES = 16


def preempt_for(db: Session, pool: GpuPool, queue: Iterable[Waiting], free: int) -> list[str]:
    """Pause the lowest-priority jobs on this host when that frees enough GPUs for a
    higher-priority waiting job; return the ids asked to pause.

    The candidate is the first job that could run here but not on the free GPUs. If the policy
    lets it pause nothing here (a member's job, and the running ones are another team's), the next
    job of the same priority may, for example one of the running job's own team: the host is then
    reserved for that job, so that the GPUs it frees go to it and not to the head, which had no
    right to them. A job of lower priority than the head is never such a candidate: the head would
    outrank it and take the GPUs."""
    freeing = 0
    held: dict[str, int] | None = None
    running: list[Job] = []
    head: Waiting | None = None
    seen = 0
    for w in blocked(queue, free, pool.count, memory_gib=pool.memory_gib):
        if head is not None and (w.priority != head.priority or seen >= CANDIDATES
                                 or get_settings().reserve_after_h <= 0):
            break  # without reservations, GPUs freed for a later job would go to the head
        seen += 1
        if held is None:
            held, running = local_holdings(db, pool)
            if not held:
                return []
            # GPUs already being given back count as free: preempting another job for them would pause two.
            freeing = being_freed(held, running)
        if head is None:
            head = w
            if w.gpus - free - freeing <= 0:
                return []
        chosen = _victims(db, w, held, running, w.gpus - free - freeing)
        if not chosen:
            continue
        for_job = db.get(Job, w.id)
        if for_job is None:
            continue
        if w is not head and not hold_host(db, for_job.id, pool.host):
            continue
        asked = [v.id for v in chosen if control.preempt(db, v, for_job)]
        if asked:
            log.warning("preempting %s for job %s (priority %s)", asked, w.id, w.priority)
        elif w is not head:
            release_host(db, for_job.id, pool.host)
        return asked
    db.rollback()
    return []


def _victims(db: Session, w: Waiting, held: dict[str, int], running: list[Job], need: int) -> list[Job]:
    """The lowest-priority running jobs here that `w` may pause and whose GPUs cover `need`, or []."""
    victims = sorted((j for j in running if not j.pause_requested and j.priority < w.priority
                      and policy.may_preempt(db, w.priority, w.owner or None, j.owner_id)),
                     key=lambda j: (j.priority, -(j.started_at or 0)))
    chosen = []
    for v in victims:
        if need <= 0:
            break
        chosen.append(v)
        need -= held[v.id]
    return chosen if need <= 0 else []


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
