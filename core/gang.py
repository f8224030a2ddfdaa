"""Jobs across hosts: the gang of hosts that runs one job (spec `nodes` above 1), kept in the database.

A worker that can lead such a job (its host has the job's GPUs free) reserves its own GPUs, then
in one transaction takes the job's lease and inserts one `gang_members` row per host: itself and
followers whose GPUs its registry says are all free and that are in no other gang (`host` is
unique). A second gang racing for a host fails its commit and gives everything back, so no host
ever holds GPUs waiting for a host that another gang holds: two such jobs cannot deadlock.

Followers find their row by polling, join it, lock their GPUs and wait until the leader marks
its row ready (the rendezvous endpoint and the checkpoint every rank resumes from). Every member
heartbeats its row; the leader watches them (`problem`) and stops the job when one is gone. The
rows go with the attempt: `core.states.transition` deletes them when the job leaves `running`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core import states
from core.jobs import claim_lease
from core.models import GangMember, Job, now

# A follower trainer that ended while the leader's goes on: the leader waits this long for its own
# ranks to notice (a failed collective) before it stops them itself.
MEMBER_EXIT_GRACE_S = 10.0
# A follower's exit code when its GPUs did not come free (a job of its host took them as the gang
# formed): the attempt ends, but not as a failure of the job (no retry counted).
GPUS_BUSY = -2
# The trainer's exit code after a pause (docs/internals.md): all ranks vote on a pause together, so
# a follower that paused means the leader's ranks pause too; it is not a failure of the attempt.
PAUSED = 75


def busy_hosts(db: Session) -> set[str]:
    """Hosts in a gang now (leading or following one)."""
    return set(db.scalars(select(GangMember.host)))


def awaited_here(db: Session, host: str) -> bool:
    """A gang reserved this host and none of its workers has joined yet: its GPUs are promised."""
    return db.scalar(select(GangMember.job_id).where(GangMember.host == host, GangMember.worker_id.is_(None))
                     .limit(1)) is not None


def form(db: Session, job_id: str, worker_id: str, leader_host: str, followers: list[str], gpus: int) -> Job | None:
    """Lease a queued job and reserve its hosts in one transaction; None when the job was taken or
    a host joined another gang meanwhile (nothing is kept then)."""
    job = claim_lease(db, job_id, worker_id, None, host=leader_host)
    if job is None:
        return None
    t = job.lease_heartbeat_at or now()
    hosts = [leader_host, *followers]
    db.add_all(GangMember(job_id=job_id, node_rank=i, host=h, attempt=job.lease_attempt, gpus=gpus,
                          worker_id=worker_id if i == 0 else None, joined_at=t if i == 0 else None,
                          heartbeat_at=t if i == 0 else None, ready=False, created_at=t)
               for i, h in enumerate(hosts))
    try:
        # Inside: the transition's own statements flush the rows above (a taken host fails there).
        states.transition(db, job, states.RUNNING,
                          f"Job started across {len(hosts)} hosts led by {worker_id} (attempt {job.lease_attempt}): "
                          + ", ".join(hosts) + ".")
        db.commit()
    except IntegrityError:
        db.rollback()
        return None
    return job


def dissolve(db: Session, job_id: str) -> None:
    """Free the job's hosts; the caller commits (core.states.transition does, leaving `running`)."""
    db.execute(delete(GangMember).where(GangMember.job_id == job_id).execution_options(synchronize_session=False))


@dataclass(frozen=True)
class Invitation:
    job_id: str
    node_rank: int
    attempt: int
    gpus: int


def invitations(db: Session, host: str) -> list[Invitation]:
    """The gangs that reserved this host and that none of its workers has joined yet."""
    rows = [Invitation(r.job_id, r.node_rank, r.attempt, r.gpus) for r in db.execute(
        select(GangMember.job_id, GangMember.node_rank, GangMember.attempt, GangMember.gpus)
        .where(GangMember.host == host, GangMember.worker_id.is_(None)))]
    db.rollback()
    return rows


def join(db: Session, job_id: str, node_rank: int, attempt: int, worker_id: str) -> bool:
    """Take this host's place in the gang; False when another worker of the host was faster or the
    gang is gone."""
    t = now()
    res = db.execute(
        update(GangMember).where(GangMember.job_id == job_id, GangMember.node_rank == node_rank,
                                 GangMember.attempt == attempt, GangMember.worker_id.is_(None))
        .values(worker_id=worker_id, joined_at=t, heartbeat_at=t).execution_options(synchronize_session=False)
    )
    db.commit()
    return res.rowcount == 1


def mark_ready(db: Session, job_id: str, attempt: int, endpoint: str, checkpoint_id: str | None) -> None:
    db.execute(update(GangMember).where(GangMember.job_id == job_id, GangMember.node_rank == 0,
                                        GangMember.attempt == attempt)
               .values(endpoint=endpoint, resume_checkpoint=checkpoint_id, ready=True)
               .execution_options(synchronize_session=False))
    db.commit()


@dataclass(frozen=True)
class Standing:
    """What a follower learns at its heartbeat: the leader's rendezvous once ready, and whether to stop."""

    endpoint: str | None
    resume_checkpoint: str | None
    cancel: bool
    nodes: int


def beat(db: Session, job_id: str, node_rank: int, attempt: int, worker_id: str) -> Standing | None:
    """Renew a follower's place; None when the gang of this attempt is gone (stop the rank)."""
    res = db.execute(
        update(GangMember).where(GangMember.job_id == job_id, GangMember.node_rank == node_rank,
                                 GangMember.attempt == attempt, GangMember.worker_id == worker_id)
        .values(heartbeat_at=now()).execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.commit()
        return None
    leader = db.scalar(select(GangMember).where(GangMember.job_id == job_id, GangMember.node_rank == 0))
    job = db.get(Job, job_id, populate_existing=True)
    db.commit()
    if job is None or leader is None or job.lease_attempt != attempt \
            or job.status not in (states.RUNNING, states.CANCELLING):
        return None
    return Standing(leader.endpoint if leader.ready else None, leader.resume_checkpoint,
                    job.cancel_requested or job.status == states.CANCELLING, job.nodes)


def member_exited(db: Session, job_id: str, node_rank: int, attempt: int, code: int) -> None:
    db.execute(update(GangMember).where(GangMember.job_id == job_id, GangMember.node_rank == node_rank,
                                        GangMember.attempt == attempt)
               .values(exit_code=code, heartbeat_at=now()).execution_options(synchronize_session=False))
    db.commit()


@dataclass(frozen=True)
class Problem:
    message: str
    counts: bool = True  # a failure of the attempt (a retry); False: the hosts were only not free together


def problem(db: Session, job_id: str, attempt: int, ttl_s: float | None, join_by: float,
            exit_grace_s: float) -> Problem | None:
    """Why the leader must stop the job's ranks now, or None while every host plays its part.

    A host that never joined by `join_by`, one whose heartbeat is older than the lease TTL, and
    one whose trainer ended with an error while the others run, all end the attempt.
    `exit_grace_s`: how long ago an exit must be reported before it counts (the leader's own
    ranks usually notice first, as a failed collective). `ttl_s` None: heartbeats are not judged
    (just after a database outage every one looks old; worker.reaper)."""
    rows = list(db.scalars(select(GangMember).where(GangMember.job_id == job_id, GangMember.attempt == attempt,
                                                    GangMember.node_rank > 0)))
    db.rollback()
    t = now()
    for m in rows:
        if m.worker_id is None:
            if t > join_by:
                return Problem(f"host {m.host} did not start its part of the job within the join timeout")
            continue
        if m.exit_code == GPUS_BUSY:
            return Problem(f"the GPUs of host {m.host} were taken by another job", counts=False)
        if m.exit_code is not None:
            if m.exit_code not in (0, PAUSED) and (m.heartbeat_at or 0) < t - exit_grace_s:
                return Problem(f"the trainer on host {m.host} exited with code {m.exit_code}")
            continue
        if ttl_s is not None and (m.heartbeat_at or 0) < t - ttl_s:
            return Problem(f"host {m.host} stopped heartbeating")
    return None


def members(db: Session, job_id: str) -> list[GangMember]:
    rows = list(db.scalars(select(GangMember).where(GangMember.job_id == job_id).order_by(GangMember.node_rank)))
    return rows
