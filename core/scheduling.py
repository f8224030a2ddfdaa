"""Which queued job runs next: highest priority first, then fair share (core/fairshare.py: the
least-used team, then user; FIFO within a user); a job in retry back-off waits.

One ordering serves the queue position a user sees, the worker's choice of what to run on free
GPUs, and the dispatcher's re-sending of queued jobs, so all three agree.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from core import fairshare, states
from core.db import writes_to
from core.models import Job, User, now
from core.settings import get_settings

RETRY_AT = "retry_not_before"  # job.progress key: the back-off of an infrastructure retry


@dataclass(frozen=True, slots=True)
class Waiting:
    id: str
    gpus: int
    priority: int
    retry_at: float
    owner: str = ""
    team: str = ""
    created_at: float = 0.0
    min_gpu_memory_gib: float | None = None  # the least GPU memory its plan fits in (Job.min_gpu_memory_gib)
    passed_over_at: float | None = None  # Job.passed_over_at: see `reserve_for_passed_over`
    reserved_host: str | None = None
    nodes: int = 1  # hosts it spans (spec `nodes`); `gpus` counts each host's

    def fits(self, free: int, total: int, memory_gib: float | None) -> bool:
        """Fits `free` GPUs of a host with `total`, each of `memory_gib` (None: not known, not checked)."""
        big_enough = memory_gib is None or self.min_gpu_memory_gib is None or self.min_gpu_memory_gib <= memory_gib
        return self.gpus <= min(free, total) and big_enough


def waiting(db: Session, t: float | None = None) -> Sequence[Waiting]:
    """Queued jobs in the order they run, read with a few queries whatever the queue's length.

    With fair share, a worker's choice usually needs only the queue's head: the oldest
    PREFETCH jobs of each user are read and ordered, and the rest only if a caller reads past
    the part of the order that those decide (queue positions do, to the end)."""
    s = get_settings()
    if not s.fair_share:
        return _read(db, None)
    return FairQueue(db, fairshare.usage_now(db, now() if t is None else t), s.fair_share_job_gpu_hours)


PREFETCH = 32


def _read(db: Session, per_owner: int | None, *where: ColumnElement[bool]) -> list[Waiting]:
    cols = (Job.id, Job.gpus, Job.priority, Job.progress[RETRY_AT].as_float().label("retry_at"),
            Job.owner_id, Job.created_at, User.team_id, Job.min_gpu_memory_gib, Job.passed_over_at,
            Job.reserved_host, Job.spec["nodes"].as_integer().label("nodes"))
    q = select(*cols).outerjoin(User, User.id == Job.owner_id).where(Job.status == states.QUEUED, *where)
    if per_owner is None:
        rows = db.execute(q.order_by(Job.priority.desc(), Job.created_at, Job.id)).all()
    else:
        # Numbered from the index on (status, priority, owner_id, created_at, id) alone; the
        # columns are read only for the rows kept.
        rn = func.row_number().over(partition_by=(Job.priority, Job.owner_id), order_by=(Job.created_at, Job.id))
        sub = select(Job.id, rn.label("rn")).where(Job.status == states.QUEUED, *where).subquery()
        rows = db.execute(q.join(sub, sub.c.id == Job.id).where(sub.c.rn <= per_owner)).all()
    return [Waiting(r.id, r.gpus, r.priority, r.retry_at or 0.0, r.owner_id or "",
                    fairshare.team_key(r.team_id, r.owner_id), r.created_at,
                    min_gpu_memory_gib=r.min_gpu_memory_gib, passed_over_at=r.passed_over_at,
                    reserved_host=r.reserved_host, nodes=r.nodes or 1) for r in rows]


def queued_one(db: Session, job_id: str) -> Waiting | None:
    """One queued job as the queue reads it; None when it is not queued."""
    found = _read(db, None, Job.id == job_id)
    return found[0] if found else None


class FairQueue(Sequence[Waiting]):
    """The fair-share order, read in part first (see `waiting`); iterating goes on into the rest."""

    def __init__(self, db: Session, use: dict[str, float], per_gpu: float):
        self._db, self._use, self._per_gpu = db, use, per_gpu
        head = _read(db, PREFETCH + 1)
        seen: dict[tuple[int, str], int] = {}
        for w in head:
            seen[(w.priority, w.owner)] = seen.get((w.priority, w.owner), 0) + 1
        more = frozenset(k for k, n in seen.items() if n > PREFETCH)
        # Of a user with more, PREFETCH are kept: the one beyond tells only that there are more.
        kept = [w for w in head if (w.priority, w.owner) not in more] + _oldest(head, more)
        self._head, complete = fairshare.order_prefix(kept, dict(use), per_gpu, more)
        self._all: list[Waiting] | None = self._head if complete else None

    def _full(self) -> list[Waiting]:
        if self._all is None:
            # A session of its own: the caller's may be closed by now, or about to write.
            with Session(self._db.get_bind()) as s:
                self._all = fairshare.order(_read(s, None), dict(self._use), self._per_gpu)
        return self._all

    def __iter__(self) -> Iterator[Waiting]:
        yield from self._head
        if self._all is self._head:
            return
        given = {w.id for w in self._head}
        # Read again: a job of the head may have been leased meanwhile; none is given twice.
        yield from (w for w in self._full() if w.id not in given)

    def __bool__(self) -> bool:
        return bool(self._head)

    def __len__(self) -> int:
        return len(self._full())

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - Sequence's int and slice forms
        return self._full()[i]


def _oldest(head: list[Waiting], more: frozenset[tuple[int, str]]) -> list[Waiting]:
    by: dict[tuple[int, str], list[Waiting]] = {}
    for w in head:
        if (w.priority, w.owner) in more:
            by.setdefault((w.priority, w.owner), []).append(w)
    return [w for ws in by.values() for w in sorted(ws, key=lambda w: (w.created_at, w.id))[:PREFETCH]]


def queue_position(db: Session, job: Job) -> int | None:
    """1 for the next job to run; None when the job is not queued."""
    if job.status != states.QUEUED:
        return None
    return queue_positions(db, (job.id,)).get(job.id)


def queue_positions(db: Session, ids: Iterable[str]) -> dict[str, int]:
    """The queue positions of `ids` (1 runs next) from one reading of the queue, read only as far
    as the last of them: a page of jobs costs the queries of one job. Ids not queued are left out."""
    want = set(ids)
    found: dict[str, int] = {}
    if not want:
        return found
    for i, w in enumerate(waiting(db), 1):
        if w.id in want:
            found[w.id] = i
            if len(found) == len(want):
                break
    return found


# The tables the queue's order is read from: a write to one may change it.
QUEUE_TABLES = ("jobs", "users", "gpu_usage")
_clock = time.monotonic  # the age of a reading (tests move it)


class _Reading:
    """One reading of the queue's order, and the positions found in it so far (it is walked only
    as far as a request needs, like queue_positions)."""

    def __init__(self, key: tuple[Any, ...], queue: Sequence[Waiting]):
        self.key, self.read_at = key, _clock()
        self.positions: dict[str, int] = {}
        self._rest: Iterator[tuple[int, Waiting]] | None = enumerate(queue, 1)
        self._lock = threading.Lock()

    def find(self, want: set[str]) -> dict[str, int]:
        with self._lock:
            missing = want - self.positions.keys()
            while missing and self._rest is not None:
                step = next(self._rest, None)
                if step is None:
                    self._rest = None
                    break
                self.positions[step[1].id] = step[0]
                missing.discard(step[1].id)
        return {i: self.positions[i] for i in want if i in self.positions}


_reading: _Reading | None = None
_reading_lock = threading.Lock()


def shown_positions(db: Session, ids: Iterable[str], max_age_s: float) -> dict[str, int]:
    """queue_positions as the API shows them: one reading of the queue serves every request of
    this process for up to `max_age_s` (0: read per call), so clients polling queued jobs do not
    each read the queue. A write to the queue's tables by this process ends a reading at once;
    changes made by other processes (workers, other API processes) show within `max_age_s`. A
    job queued since the reading (not in it) gets a new one."""
    want = set(ids)
    if not want or max_age_s <= 0:
        return queue_positions(db, want)
    global _reading
    s = get_settings()
    # Taken before the read: a write committed while it runs makes the reading stale at once.
    key = (db.get_bind(), writes_to(*QUEUE_TABLES), s.fair_share, s.fair_share_half_life_h, s.fair_share_job_gpu_hours)

    def current() -> _Reading | None:
        r = _reading
        return r if r is not None and r.key == key and _clock() - r.read_at <= max_age_s else None

    seen = current()
    if seen is not None and len(found := seen.find(want)) == len(want):
        return found
    with _reading_lock:  # one thread reads the queue; the others wait for its reading
        other = current()
        if other is not None and other is not seen and len(found := other.find(want)) == len(want):
            return found
        reading = _reading = _Reading(key, waiting(db))
    return reading.find(want)


def pick(queue: list[Waiting], free: int, total: int, t: float | None = None,
         memory_gib: float | None = None) -> Waiting | None:
    """The first job in queue order that fits `free` GPUs of a host with `total`, of `memory_gib` each.

    Skipping a head job that does not fit now (backfill) keeps GPUs busy; the head job gets its
    GPUs through preemption when it outranks what runs (core.control.preempt). A job whose plan
    needs more memory than this host's GPUs have is left to a larger host.
    """
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and w.fits(free, total, memory_gib):
            return w
    return None


def blocked(queue: Iterable[Waiting], free: int, total: int, t: float | None = None,
            memory_gib: float | None = None) -> Iterator[Waiting]:
    """The jobs, in queue order, that could run on this host but not with its free GPUs now."""
    if free >= total:  # none: and the queue need not be read to its end to know it
        return
    t = now() if t is None else t
    for w in queue:
        if w.retry_at <= t and free < w.gpus and w.fits(total, total, memory_gib):
            yield w


def blocked_head(queue: Iterable[Waiting], free: int, total: int, t: float | None = None,
                 memory_gib: float | None = None) -> Waiting | None:
    """The first job that could run on this host but not with its free GPUs now."""
    return next(blocked(queue, free, total, t, memory_gib), None)


# -- reservations against starvation -----------------------------------------------------------
#
# Backfill (`pick` skipping a job that does not fit the free GPUs) keeps GPUs busy, but a job of
# many GPUs may then never find enough free at once: smaller jobs behind it keep taking the GPUs
# it waits for. So a worker notes each job it passes over that way (`passed_over_at`, the first
# time). Once a job has been passed over for `reserve_after_h`, the next host that fits it and
# would pass it over again is reserved for it instead (`reserved_host`): that host starts no new
# job until the reserved one runs there (or elsewhere), so its GPUs drain to it. One job holds at
# most one host and a host at most one job; a job of higher priority than the reserved one still
# goes first. A reservation lasts while its host is alive (one of its jobs holds a live lease);
# one whose host died is taken over by the next host that would pass the job over.


def reserved_here(db: Session, host: str, total: int, memory_gib: float | None) -> Waiting | None:
    """The queued job this host is reserved for, if any. A reservation whose job no longer fits the
    host (its memory need grew after an out-of-memory) is given up."""
    held = _read(db, None, Job.reserved_host == host)
    for w in held:
        if not w.fits(total, total, memory_gib):
            release_host(db, w.id, host)
    fitting = [w for w in held if w.fits(total, total, memory_gib)]
    return min(fitting, key=lambda w: (-w.priority, w.created_at, w.id)) if fitting else None


def hold_host(db: Session, job_id: str, host: str) -> bool:
    """Reserve `host` for a queued job now (a preemption made room there for it), unless the job
    holds another host. Commits."""
    res = db.execute(update(Job).where(Job.id == job_id, Job.status == states.QUEUED,
                                       (Job.reserved_host.is_(None)) | (Job.reserved_host == host))
                     .values(reserved_host=host).execution_options(synchronize_session=False))
    db.commit()
    return res.rowcount == 1


def release_host(db: Session, job_id: str, host: str) -> None:
    """Give up the job's reservation of `host`, if it holds one. Commits."""
    db.execute(update(Job).where(Job.id == job_id, Job.reserved_host == host).values(reserved_host=None)
               .execution_options(synchronize_session=False))
    db.commit()


def host_alive(db: Session, host: str, t: float, ttl_s: float) -> bool:
    """Whether a job on `host` holds a live lease: a host that drains for a reservation runs some."""
    return db.scalar(select(Job.id).where(Job.host == host, Job.status.in_([states.RUNNING, states.CANCELLING]),
                                          Job.lease_heartbeat_at >= t - ttl_s).limit(1)) is not None


def reserve_for_passed_over(db: Session, queue: Iterable[Waiting], chosen: Waiting, free: int, total: int,
                            memory_gib: float | None, host: str, t: float, after_h: float,
                            ttl_s: float) -> Waiting | None:
    """`chosen` is about to start on this host's free GPUs: note the jobs ahead of it in the queue
    order that fit this host but not its free GPUs as passed over, and reserve the host for the
    first of them passed over for `after_h` or longer (unless a live host already holds it).
    Returns the job reserved for (the caller then starts nothing), or None. Commits."""
    passed = []
    for w in queue:
        if w.id == chosen.id:
            break
        if w.retry_at <= t and w.priority >= chosen.priority and w.fits(total, total, memory_gib):
            passed.append(w)
    if not passed:
        return None
    new = [w.id for w in passed if w.passed_over_at is None]
    if new:
        db.execute(update(Job).where(Job.id.in_(new), Job.status == states.QUEUED, Job.passed_over_at.is_(None))
                   .values(passed_over_at=t).execution_options(synchronize_session=False))
    reserved = None
    if after_h > 0:
        for w in passed:
            waited = t - w.passed_over_at if w.passed_over_at is not None else 0.0
            # A host with half the job's GPUs free already drains sooner than one with fewer:
            # taken first; after twice the time, any host that fits it is.
            if waited < after_h * 3600.0 or (2 * free < w.gpus and waited < 2 * after_h * 3600.0):
                continue
            if w.reserved_host is not None and (w.reserved_host == host or host_alive(db, w.reserved_host, t, ttl_s)):
                continue
            # Conditional on the holder read: of two hosts claiming at once, one wins.
            holder = Job.reserved_host.is_(None) if w.reserved_host is None else Job.reserved_host == w.reserved_host
            res = db.execute(update(Job).where(Job.id == w.id, Job.status == states.QUEUED, holder)
                             .values(reserved_host=host).execution_options(synchronize_session=False))
            if res.rowcount == 1:
                reserved = w
                break
    db.commit()
    return reserved
