"""One reader of job events per API process, fanning them out to every open event stream.

An open stream costs a queue and nothing else: no thread and no database connection while it
waits. One task per process reads every watched job's new events each POLL_S, in one short
session on a thread of its own (one pooled connection, held for the read alone; two queries
for all the jobs, core.event_feed.poll_many), and hands each event to every stream of its job:
a hundred streams of one job cost the database what one does.

A stream that joins late first gets, in seq order, the events after its cursor that the job's
feed has already handed out (`catch-up`), then the feed's new events as they come, so it misses
none and sees each once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from core.db import read_session
from core.event_feed import BATCH, EventFeed, poll_many
from core.models import JobEvent

log = logging.getLogger("tuneq.api")

POLL_S = 0.5
# A stream whose client stopped reading is closed once this many events wait for it; the
# client's reconnect (Last-Event-ID) resumes it without loss.
MAX_BEHIND = 10_000
# A new stream wakes the reader for its catch-up; the reader waits this long first, for the
# streams that open with it (opens come in bursts and are let through two at a time).
JOIN_WAIT_S = 0.05
# After a failed read (database restarting) the hub waits this long before the next one.
RETRY_S = 1.0


@dataclass(eq=False)
class Watcher:
    job_id: str
    start: int  # events at or below this seq are not this stream's
    cursor: int  # catch-up has handed out every event the feed emitted up to here
    queue: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    caught_up: bool = False


@dataclass(eq=False)
class Channel:
    feed: EventFeed
    watchers: set[Watcher] = field(default_factory=set)
    status: str | None = None
    finished: bool = False


class EventHub:
    def __init__(self, render: Callable[[JobEvent], bytes], poll_s: float = POLL_S, join_wait_s: float = JOIN_WAIT_S):
        self.render = render  # an event as the stream sends it, made once on the reader's thread
        self.poll_s = poll_s
        self.join_wait_s = join_wait_s
        self.channels: dict[str, Channel] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        # Its own thread limiter: a flood of requests filling the shared thread pool must not
        # stop the streams, and one read at a time is all the hub ever needs.
        self.limiter = anyio.CapacityLimiter(1)

    async def watch(self, job_id: str, after_seq: int) -> AsyncIterator[tuple[str, Any]]:
        """("event", (id, data)) for each event after after_seq, then ("end", status) once the
        job has ended and its events are sent; ("dropped", None) if this stream fell too far behind."""
        self._bind_loop()
        channel = self.channels.get(job_id)
        if channel is None:
            channel = self.channels[job_id] = Channel(EventFeed(job_id, after_seq))
        w = Watcher(job_id, start=after_seq, cursor=after_seq)
        channel.watchers.add(w)
        self.wake.set()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run(), name="tuneq-event-hub")
        try:
            while True:
                kind, item = await w.queue.get()
                yield kind, item
                if kind != "event":
                    return
        finally:
            channel.watchers.discard(w)
            if not channel.watchers and self.channels.get(job_id) is channel:
                del self.channels[job_id]

    def _bind_loop(self) -> None:
        # A test client runs each app instance on a loop of its own; a new loop starts afresh.
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.loop, self.channels, self.task, self.wake = loop, {}, None, asyncio.Event()

    async def _run(self) -> None:
        while self.channels:
            self.wake.clear()
            snapshot = [(ch, [w for w in ch.watchers if not w.caught_up]) for ch in self.channels.values()]
            try:
                results = await anyio.to_thread.run_sync(self._read, snapshot, limiter=self.limiter)
            except Exception:  # noqa: BLE001 - a database outage: streams wait, the next read retries
                log.warning("reading job events failed; retrying in %.1fs", RETRY_S, exc_info=True)
                await asyncio.sleep(RETRY_S)
                continue
            for ch, fresh, status, catchups in results:
                self._deliver(ch, fresh, status, catchups)
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            except TimeoutError:
                continue
            # Woken (a stream joined, or catch-up is left): let the streams opening with it
            # join first, so a burst of opens costs a few reads, not one each.
            await asyncio.sleep(self.join_wait_s)

    def _read(self, snapshot: list[tuple[Channel, list[Watcher]]]) -> list[tuple[Any, ...]]:
        """On the hub's thread: each channel's new events, and the catch-up of its new watchers."""
        out = []
        with read_session() as db:
            live = [ch for ch, _ in snapshot if not ch.finished]
            polled = dict(zip(live, poll_many(db, [ch.feed for ch in live]), strict=True))
            for ch, pending in snapshot:
                fresh, status = polled.get(ch, ([], ch.status))
                # Watchers that joined together start from the same cursor (a page of streams
                # opened at once, clients reconnecting after a restart): one read and one
                # rendering serve them all, not one each.
                by_cursor: dict[int, list[tuple[int, str, bytes]]] = {}
                for w in pending:
                    if w.cursor not in by_cursor:
                        by_cursor[w.cursor] = self._rendered(ch.feed.sent_since(db, w.cursor))
                out.append((ch, self._rendered(fresh), status, {w: by_cursor[w.cursor] for w in pending}))
        return out

    def _rendered(self, events: list[JobEvent]) -> list[tuple[int, str, bytes]]:
        return [(ev.seq, ev.id, self.render(ev)) for ev in events]

    def _deliver(self, ch: Channel, fresh: list[tuple[int, str, bytes]], status: str | None,
                 catchups: dict[Watcher, list[tuple[int, str, bytes]]]) -> None:
        ch.status = status
        if not ch.finished and EventFeed.finished(status, fresh):
            ch.finished = True
        for w in list(ch.watchers):
            if w in catchups:
                batch = catchups[w]
                self._put(ch, w, batch)
                if batch:
                    w.cursor = batch[-1][0]
                # This read's fresh events are in the catch-up: the feed emitted them first.
                w.caught_up = len(batch) < BATCH
            elif w.caught_up:
                self._put(ch, w, [ev for ev in fresh if ev[0] > w.start])
            # A watcher that joined during the read gets these events by its catch-up next time.
            if ch.finished and w.caught_up and w in ch.watchers:
                w.queue.put_nowait(("end", status))
                ch.watchers.discard(w)
        if any(not w.caught_up for w in ch.watchers):
            self.wake.set()  # more catch-up to send: no need to wait a whole poll

    def _put(self, ch: Channel, w: Watcher, events: list[tuple[int, str, bytes]]) -> None:
        for _, ev_id, data in events:
            w.queue.put_nowait(("event", (ev_id, data)))
        if w.queue.qsize() > MAX_BEHIND:
            w.queue.put_nowait(("dropped", None))
            ch.watchers.discard(w)
