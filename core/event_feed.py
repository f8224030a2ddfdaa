"""A job's events in the order they were written, read by repeated polls: what an SSE stream sends.

Polling the database (not a Redis channel) keeps one source of truth and works across API
processes and hosts. An API process keeps one feed per watched job, however many streams watch
it (api/event_hub.py), so a poll is two indexed queries per job, not per watcher.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.models import Job, JobEvent

BATCH = 200
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
        status = db.scalar(select(Job.status).where(Job.id == self.job_id))
        rows = db.scalars(
            select(JobEvent).where(JobEvent.job_id == self.job_id, JobEvent.seq > self.floor)
            .order_by(JobEvent.seq).limit(BATCH + len(self.sent))
        ).all()
        fresh = [ev for ev in rows if ev.seq not in self.sent][:BATCH]
        t = self.clock()
        for ev in fresh:
            self.sent[ev.seq] = t
        if fresh:
            self.marks.append((t, max(self.sent)))
        self._raise_floor(t)
        return fresh, status

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
