"""A job's event log: a page, newest first like OpenAI's, or (`?stream=true`) a live SSE stream.

The stream sends events oldest first. Without a cursor it starts with the newest `limit` events;
with one (`after`, or the `Last-Event-ID` a reconnecting EventSource sends, which wins) it sends
every event after that one, so a reconnect loses nothing. Each SSE message has the event's id as
`id` and the event object (as in the page) as JSON `data`; a comment line every PING_S keeps
proxies from closing an idle stream. When the job has ended and its last events are sent, a
final `event: end` with `{"id": job id, "status": ...}` tells the client not to reconnect. A
stream whose key was revoked, or whose reader lost access to the job, ends with `event: error`
and the error object a new request would get (RECHECK_S).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.crud import load_job
from api.deps import BearerToken, SettingsDep, in_one_hop, read_in_one_hop
from api.errors import APIError, bad_request, error_body
from api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, make_page, page_size
from api.schemas import EventOut, Page
from api.event_hub import EventHub
from core.event_feed import start_seq
from core.models import JobEvent, User
from core.settings import Settings

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

PING_S = 15.0
# Threads that opening streams may hold at once, apart from the shared pool: a burst of opens
# (a dashboard's page of streams, every client reconnecting after a restart) waits its turn
# here instead of taking the threads, and the interpreter lock, that polls and lists need.
OPENING = anyio.CapacityLimiter(2)
# An open stream checks its key again this often: a revoked key (or a reader who lost access to
# the job) stops getting events within this time, not when the job ends, hours later. One query a
# stream per period, through a limiter of its own so that many streams' checks queue here.
RECHECK_S = 5.0
RECHECKING = anyio.CapacityLimiter(1)

STREAM_DOC = {200: {"description": "A page of events, or with stream=true a text/event-stream of them.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


# The stored level and kind are tuneq's own; OpenAI's event has fewer of each.
OPENAI_LEVEL = {"info": "info", "warning": "warn", "warn": "warn", "error": "error"}


def event_out(ev: JobEvent) -> EventOut:
    return EventOut(id=ev.id, created_at=int(ev.created_at), level=OPENAI_LEVEL.get(ev.level, "info"),
                    message=ev.message, type="metrics" if ev.type == "metrics" else "message", data=ev.data,
                    kind=ev.type)


@router.get("/{job_id}/events", response_model=Page[EventOut], responses=STREAM_DOC)
async def list_fine_tuning_events(
    job_id: str, token: BearerToken, settings: SettingsDep, after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    stream: Annotated[bool, Query(description="Send the events as server-sent events, oldest first, live until "
                                              "the job ends (tuneq extension).")] = False,
    last_event_id: Annotated[str | None, Header(description="With stream=true: resume after this event "
                                                           "(sent by a reconnecting EventSource).")] = None,
) -> Response:
    if not stream:
        return await read_in_one_hop(_event_page, token, job_id, after, limit, settings)
    # Opening a stream is a read like a poll, in one hop too: streams are opened in bursts (a
    # dashboard's page, every client reconnecting after a restart), and one thread hop per sync
    # dependency made each open several waits for a thread and for the interpreter lock, during
    # which the short reads queued behind the burst. The hop holds its connection for its
    # queries alone; the hub reads for the stream afterwards.
    cursor, param = (last_event_id, "Last-Event-ID") if last_event_id else (after, "after")
    job_id, seq = await in_one_hop(_stream_start, token, job_id, cursor, param, limit, settings, limiter=OPENING)
    return EventSourceResponse(_follow(job_id, seq, token), ping=PING_S, sep=SEP,
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _stream_start(db: Session, user: User, job_id: str, cursor: str | None, param: str, limit: int,
                  settings: Settings) -> tuple[str, int]:
    """The job's id and the seq its stream starts after (400 for a cursor that names no event of it)."""
    limit = page_size(limit, settings)
    job = load_job(db, job_id, user)
    seq = start_seq(db, job.id, after_event_id=cursor, backlog=limit)
    if seq is None:
        raise bad_request(f"{param}: no event with id {cursor!r} in job {job.id}", param)
    return job.id, seq


def _event_page(db: Session, user: User, job_id: str, after: str | None, limit: int,
                settings: Settings) -> Page[EventOut]:
    limit = page_size(limit, settings)
    job = load_job(db, job_id, user)
    # seq, not created_at: events written in one transaction share a timestamp but never a seq.
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        cursor_row = db.scalar(select(JobEvent).where(JobEvent.id == after, JobEvent.job_id == job.id))
        if cursor_row is None:
            raise bad_request(f"after: no event with id {after!r} in job {job.id}", "after")
        stmt = stmt.where(JobEvent.seq < cursor_row.seq)
    rows = db.scalars(stmt.order_by(JobEvent.seq.desc()).limit(limit + 1)).all()
    return make_page(rows, limit, event_out)


SEP = "\r\n"  # the stream's line separator: the messages below are made with it


def _render(ev: JobEvent) -> bytes:
    # The whole SSE message, encoded once per event on the hub's thread: every stream of the job
    # sends these same bytes.
    return ServerSentEvent(id=ev.id, data=event_out(ev).model_dump_json(), sep=SEP).encode()


HUB = EventHub(_render)


def _still_readable(db: Session, user: User, job_id: str) -> None:
    load_job(db, job_id, user)


async def _follow(job_id: str, after_seq: int, token: str) -> AsyncIterator[bytes | dict[str, Any]]:
    watch = HUB.watch(job_id, after_seq)
    checked = time.monotonic()
    pending: asyncio.Future[tuple[str, Any]] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(watch.__anext__())
            # Waits for the next event without cancelling it, so that the key is checked on a
            # quiet stream too.
            await asyncio.wait({pending}, timeout=RECHECK_S)
            if time.monotonic() - checked >= RECHECK_S:
                try:
                    await in_one_hop(_still_readable, token, job_id, limiter=RECHECKING)
                except APIError as exc:  # revoked, or the job is no longer this reader's
                    yield {"event": "error", "data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
                    return
                checked = time.monotonic()
            if not pending.done():
                continue
            try:
                kind, item = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            if kind == "event":
                yield item[1]  # the encoded message
            elif kind == "end":
                yield {"event": "end", "data": json.dumps({"id": job_id, "status": item})}
                return
            else:  # "dropped": the client stopped reading; closing lets it reconnect and resume.
                return
    finally:
        if pending is not None and not pending.done():
            # The wait is inside the hub's generator: cancelled and awaited, it leaves the generator
            # closed (its watcher removed). aclose() alone would find it still running.
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await watch.aclose()
