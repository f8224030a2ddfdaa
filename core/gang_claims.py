"""Preemption for a job across hosts: the hosts a waiting one claims, and the jobs paused there for it.

A job of one host preempts on the host that looks at it (worker.placement.preempt_for). A job
across N hosts needs room on N hosts at once, and a host freed alone would only be backfilled
again. So the worker that finds such a job at the top of the queue, unable to start, claims N
hosts where pausing lower-priority jobs (or nothing) makes room: one `gang_claims` row per host,
all in one transaction. It asks those jobs to pause (core.control.preempt; a running job across
hosts among them pauses on all its hosts, as one job). A claimed host starts no job of the
claim's priority or lower but the claimer, and its workers lead the claimer once every claimed
host has the GPUs free (worker.placement).

No deadlock and no livelock between such jobs: a job claims all its hosts at once or none, so
none holds some hosts while it waits for others that another holds; a claim passes only to a job
of strictly higher priority, which takes all of the loser's claims, so two jobs never take hosts
from each other in turn; and nothing preempts a job of its own priority. Claims go when the job
leaves the queue (core.states.transition), and are given up when a claimed host can no longer
make room (a job that outranks the claimer started there, or the host left the registry); the
job then claims afresh.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import control, policy, states, workers
from core.models import GangClaim, GangMember, Job, now
from core.scheduling import Waiting

HOLDING = (states.RUNNING, states.CANCELLING)


@dataclass(frozen=True)
class Held:
    """A job holding GPUs on a host, as the database knows it."""

    job_id: str
    gpus: int  # on this host
    priority: int
    owner: str | None
    started_at: float
    freeing: bool  # asked to pause or cancelled: its GPUs are coming free
    gang: bool  # a job across hosts (a host serves one at a time)


def holdings(db: Session, hosts: Iterable[str]) -> dict[str, list[Held]]:
    """What runs on each of `hosts`: jobs of one host by their `host`, jobs across hosts by their
    gang rows (a follower host is not the job's `host`)."""
    hosts = list(hosts)
    out: dict[str, list[Held]] = {h: [] for h in hosts}

    def held(job: Job, gpus: int, gang: bool) -> Held:
        freeing = job.pause_requested or job.cancel_requested or job.status == states.CANCELLING
        return Held(job.id, gpus, job.priority, job.owner_id, job.started_at or 0.0, freeing, gang)

    for job in db.scalars(select(Job).where(Job.status.in_(HOLDING), Job.host.in_(hosts))):
        if job.nodes == 1 and job.host is not None:
            out[job.host].append(held(job, job.gpus, False))
    for m, job in db.execute(select(GangMember, Job).join(Job, Job.id == GangMember.job_id)
                             .where(GangMember.host.in_(hosts), Job.status.in_(HOLDING))).all():
        out[m.host].append(held(job, m.gpus, True))
    return out


@dataclass(frozen=True)
class Room:
    """How a job gets its GPUs on one host: the jobs to pause there (none when they are free)."""

    host: str
    victims: tuple[Held, ...]

    @property
    def cost(self) -> int:
        return sum(v.gpus for v in self.victims)


def room_on(db: Session, w: Waiting, host: dict[str, Any], held: list[Held]) -> Room | None:
    """The fewest lower-priority jobs to pause on `host` (a workers.hosts() entry) for `w`'s GPUs,
    lowest priority and newest first, as preempt_for chooses; None when no choice makes room."""
    memory = workers.gpu_memory_gib(host["gpu_info"])
    if host["disk_full"] or host["gpus"] < w.gpus or (
            w.min_gpu_memory_gib is not None and memory is not None and memory < w.min_gpu_memory_gib):
        return None
    # GPUs already being given back count as free: pausing another job for them would pause two.
    need = w.gpus - min(host["free"], host["gpus"]) - sum(x.gpus for x in held if x.freeing)
    owner = w.owner or None
    victims = sorted((x for x in held if not x.freeing and x.priority < w.priority
                      and policy.may_preempt(db, w.priority, owner, x.owner)),
                     key=lambda x: (x.priority, -x.started_at))
    chosen: list[Held] = []
    for v in victims:
        if need <= 0:
            break
        chosen.append(v)
        need -= v.gpus
    # A host serves one job across hosts at a time: one staying there leaves no place for `w`.
    if need > 0 or any(x.gang and not x.freeing and x not in chosen for x in held):
        return None
    return Room(host["host"], tuple(chosen))


def plan(db: Session, w: Waiting, hosts: list[dict[str, Any]]) -> list[Room] | None:
    """`w.nodes` hosts for `w`, those with the fewest GPUs to free first; None when too few can
    make room. Hosts claimed by a job of `w`'s priority or higher are not taken."""
    kept = {c.host for c in db.scalars(select(GangClaim).where(GangClaim.job_id != w.id,
                                                                GangClaim.priority >= w.priority))}
    candidates = [h for h in hosts if h["host"] not in kept]
    held = holdings(db, [h["host"] for h in candidates])
    rooms = [r for h in candidates if (r := room_on(db, w, h, held[h["host"]])) is not None]
    db.rollback()
    if len(rooms) < w.nodes:
        return None
    return sorted(rooms, key=lambda r: (r.cost, r.host))[: w.nodes]


def claim(db: Session, w: Waiting, rooms: list[Room]) -> list[str] | None:
    """Claim the hosts of `rooms` for `w` in one transaction, then ask their victims to pause.
    Returns the ids asked to pause, or None when `w` is no longer queued or another job claimed a
    host meanwhile (nothing is kept then)."""
    hosts = [r.host for r in rooms]
    # Holding the job's row (an UPDATE that changes nothing) while claiming: a worker leasing it
    # meanwhile waits, and its transition then removes these rows.
    res = db.execute(update(Job).where(Job.id == w.id, Job.status == states.QUEUED).values(status=states.QUEUED)
                     .execution_options(synchronize_session=False))
    if res.rowcount != 1:
        db.rollback()
        return None
    losers = select(GangClaim.job_id).where(GangClaim.host.in_(hosts), GangClaim.priority < w.priority)
    db.execute(delete(GangClaim).where((GangClaim.job_id == w.id) | GangClaim.job_id.in_(losers))
               .execution_options(synchronize_session=False))
    t = now()
    db.add_all(GangClaim(host=h, job_id=w.id, priority=w.priority, created_at=t) for h in hosts)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        return None
    for_job = db.get(Job, w.id)
    asked: list[str] = []
    for v in {v.job_id: v for r in rooms for v in r.victims}.values():  # a job across hosts once
        victim = db.get(Job, v.job_id)
        if for_job is not None and victim is not None and control.preempt(db, victim, for_job):
            asked.append(v.job_id)
    return asked


@dataclass(frozen=True)
class Claim:
    host: str
    job_id: str
    priority: int
    created_at: float


def holder(db: Session, host: str) -> Claim | None:
    """The claim on `host`, if any."""
    row = db.execute(select(GangClaim.job_id, GangClaim.priority, GangClaim.created_at)
                     .where(GangClaim.host == host)).first()
    db.rollback()
    return Claim(host, row.job_id, row.priority, row.created_at) if row is not None else None


def claimed(db: Session, job_id: str) -> list[str]:
    hosts = list(db.scalars(select(GangClaim.host).where(GangClaim.job_id == job_id).order_by(GangClaim.host)))
    db.rollback()
    return hosts


def release(db: Session, job_id: str) -> None:
    """Give up the job's claims; the caller commits."""
    db.execute(delete(GangClaim).where(GangClaim.job_id == job_id).execution_options(synchronize_session=False))


def still_room(db: Session, w: Waiting, hosts: dict[str, dict[str, Any]], claimed_hosts: list[str]) -> bool:
    """Whether every claimed host can still make room for `w`: registered, and not held by jobs
    that `w` may not pause. The registry's free count lags a pause by a pass, so it is not read."""
    if len(claimed_hosts) != w.nodes or any(h not in hosts for h in claimed_hosts):
        return False
    held = holdings(db, claimed_hosts)
    owner = w.owner or None
    for h in claimed_hosts:
        staying = sum(x.gpus for x in held[h] if not x.freeing and (
            x.priority >= w.priority or not policy.may_preempt(db, w.priority, owner, x.owner)))
        if staying > hosts[h]["gpus"] - w.gpus:
            db.rollback()
            return False
    db.rollback()
    return True
