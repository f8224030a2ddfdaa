"""A job's events in the order they were written, read by repeated polls: what an SSE stream sends.

Polling the database (not a Redis channel) keeps one source of truth and works across API
processes and hosts. An API process keeps one feed per watched job, however many streams watch
it (api/event_hub.py), and polls them all at once (`poll_many`): two queries per read of the
process, however many jobs and streams it follows.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from sqlalchemy import select, union_all
from sqlalchemy.orm import Session

from core import states
from core.models import Job, JobEvent

BATCH = 200
# Feeds polled by one query: SQLite allows 500 parts in a compound SELECT.
FEEDS_PER_QUERY = 100
# PostgreSQL hands out seq numbers at INSERT but makes rows visible at COMMIT, so an event can
# appear after one with a higher seq (two writers: the worker and an API request). Each poll
# looks back over what was new this long ago and sends only rows it has not sent yet.
LATE_COMMIT_S = 2.0


def start_seq(db: Session, job_id: str, *, after_event_id: str | None, backlog: int) -> int | None:
    """The seq the feed starts after: the cursor event's, or the one before the newest `backlog`
    events. None when the cursor names no event of this job."""
    if after_event_id is not None:
        return db.scalar(select(JobEvent.seq).where(JobEvent.id == after_event_id, JobEvent.job_id == job_id))
    newest = db.scalars(
        select(JobEvent.seq).where(JobEvent.job_id == job_id).order_by(JobEvent.seq.desc()).limit(backlog)
    ).all()
    return newest[-1] - 1 if newest else 0


class EventFeed:
    def __init__(self, job_id: str, after_seq: int, clock=time.monotonic):  # noqa: ANN001 - a monotonic clock
        self.job_id = job_id
        self.clock = clock
        self.floor = after_seq  # every event at or below it is sent (or came before the start)
        self.sent: dict[int, float] = {}  # seq -> when it was sent, for seqs above the floor
        self.marks: deque[tuple[float, int]] = deque()  # (when, highest seq sent by then)

    def poll(self, db: Session) -> tuple[list[JobEvent], str | None]:
        """Events not sent yet, oldest first, and the job's status (None: the job is gone).

        The status is read before the events: once it is terminal, the events read after it
        include the final transition's, which is committed with it. The caller's session is
        ended between polls (a fresh snapshot each time) and the rows it returns are detached.
        """
        return poll_many(db, [self])[0]

    def _unsent(self):  # noqa: ANN202 - a SELECT of this feed's events from its floor on
        return (select(JobEvent).where(JobEvent.job_id == self.job_id, JobEvent.seq > self.floor)
                .order_by(JobEvent.seq).limit(BATCH + len(self.sent)))

    def _take(self, rows: list[JobEvent]) -> list[JobEvent]:
        """The rows of `_unsent` (seq order) not sent yet, now marked sent."""
        fresh = [ev for ev in rows if ev.seq not in self.sent][:BATCH]
        t = self.clock()
        for ev in fresh:
            self.sent[ev.seq] = t
        if fresh:
            self.marks.append((t, max(self.sent)))
        self._raise_floor(t)
        return fresh

    def sent_since(self, db: Session, after_seq: int) -> list[JobEvent]:
        """Events above after_seq that this feed has already handed out, oldest first, at most
        BATCH: what a watcher that joins late must be shown before the feed's next events."""
        emitted = JobEvent.seq <= self.floor
        if self.sent:
            emitted = emitted | JobEvent.seq.in_(list(self.sent))
        return list(db.scalars(
            select(JobEvent).where(JobEvent.job_id == self.job_id, JobEvent.seq > after_seq, emitted)
            .order_by(JobEvent.seq).limit(BATCH)
        ).all())

    def _raise_floor(self, t: float) -> None:
        while self.marks and t - self.marks[0][0] >= LATE_COMMIT_S:
            _, seq = self.marks.popleft()
            self.floor = max(self.floor, seq)
        self.sent = {s: w for s, w in self.sent.items() if s > self.floor}

    @staticmethod
    def finished(status: str | None, batch: list[Any]) -> bool:
        """The job ended (or vanished) and this poll drained its events."""
        return (status is None or status in states.TERMINAL) and len(batch) < BATCH


def poll_many(db: Session, feeds: list[EventFeed]) -> list[tuple[list[JobEvent], str | None]]:
    """EventFeed.poll of each feed, in two queries for up to FEEDS_PER_QUERY feeds: the jobs'
    statuses, then every feed's unsent events (each part down the (job_id, seq) index, as one
    feed's poll reads them). Statuses are read first, for the reason poll gives."""
    out: list[tuple[list[JobEvent], str | None]] = []
    for i in range(0, len(feeds), FEEDS_PER_QUERY):
        chunk = feeds[i:i + FEEDS_PER_QUERY]
        statuses = {job_id: status for job_id, status in db.execute(
            select(Job.id, Job.status).where(Job.id.in_({f.job_id for f in chunk})))}
        parts = [f._unsent() for f in chunk]
        stmt = parts[0] if len(parts) == 1 else union_all(*(p.subquery().select() for p in parts))
        rows: dict[str, list[JobEvent]] = {}
        for ev in db.scalars(select(JobEvent).from_statement(stmt)):
            rows.setdefault(ev.job_id, []).append(ev)
        for f in chunk:
            mine = sorted(rows.get(f.job_id, ()), key=lambda ev: ev.seq)
            out.append((f._take(mine), statuses.get(f.job_id)))
    return out
