"""GET /v1/fine_tuning/jobs/{id}/events?stream=true: server-sent events, live, until the job ends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.conftest import create_user_with_key
from tests.integration.conftest import make_job

# A stream that never ends is this module's likeliest failure: fail it in minutes, not at the suite's limit.
# Events are numbered by concurrent writers, and the stream reads them while they commit: the
# order rows become visible in differs between the databases, so both are checked.
pytestmark = [pytest.mark.timeout(120), pytest.mark.dialects]


@pytest.fixture
def client(db_env: dict[str, str]) -> Iterator[TestClient]:
    """The app with an admin's key; jobs are made in the database (no model or upload needed)."""
    from api.main import create_app

    _, key = create_user_with_key("admin", "admin")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture
def job_id(db: Session) -> str:
    return make_job(db).id


def sse_messages(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream: one dict per message (comments are yielded as {'comment': ...})."""
    msg: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if msg:
                yield msg
            msg = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            msg[name] = msg[name] + "\n" + value if name in msg else value


def stream(client: TestClient, job_id: str, *, params: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None, until_end: bool = True) -> list[dict[str, Any]]:
    out = []
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true", **(params or {})},
                       headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for msg in sse_messages(r.iter_lines()):
            if "comment" in msg:
                continue
            out.append(msg)
            if msg.get("event") == "end" or not until_end:
                break
    return out


def add_events(job_id: str, messages: list[str], *, then: str | None = None, delay: float = 0.0) -> None:
    from core import states
    from core.db import session_scope
    from core.jobs import request_cancel
    from core.models import Job

    for m in messages:
        time.sleep(delay)
        with session_scope() as db:
            states.add_event(db, db.get(Job, job_id), m, type="metrics", data={"note": m})
    if then == "cancel":
        time.sleep(delay)
        with session_scope() as db:
            request_cancel(db, db.get(Job, job_id))


def page_ids(client: TestClient, job_id: str) -> list[str]:
    """Every event id, oldest first, from the paged list."""
    data = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [e["id"] for e in reversed(data)]


def test_stream_sends_backlog_then_live_events_in_order_and_ends_with_the_job(client: TestClient, job_id: str) -> None:
    before = page_ids(client, job_id)
    live = [f"live {i}" for i in range(5)]
    writer = threading.Thread(target=add_events, args=(job_id, live), kwargs={"then": "cancel", "delay": 0.3})
    writer.start()
    t0 = time.monotonic()
    try:
        got = stream(client, job_id)
    finally:
        writer.join()
    events = [json.loads(m["data"]) for m in got if "id" in m]
    assert [m["id"] for m in got if "id" in m] == [e["id"] for e in events] == page_ids(client, job_id)
    assert [e["id"] for e in events[: len(before)]] == before  # the backlog, oldest first
    assert [e["message"] for e in events if e["type"] == "metrics"] == live
    assert events[-1]["kind"] == "status" and events[-1]["data"]["to"] == "cancelled"
    assert set(events[0]) == {"id", "object", "created_at", "level", "message", "type", "data", "kind"}
    assert got[-1]["event"] == "end" and json.loads(got[-1]["data"]) == {"id": job_id, "status": "cancelled"}
    assert time.monotonic() - t0 < 10  # live, not at the end of some long timeout


def test_stream_of_a_finished_job_ends_at_once_and_honours_limit(client: TestClient, job_id: str) -> None:
    add_events(job_id, [f"m{i}" for i in range(6)], then="cancel")
    every = page_ids(client, job_id)
    got = stream(client, job_id, params={"limit": 3})
    assert [m["id"] for m in got[:-1]] == every[-3:]  # the newest `limit` events, oldest first
    assert got[-1]["event"] == "end"


def test_after_and_last_event_id_resume_after_that_event(client: TestClient, job_id: str) -> None:
    add_events(job_id, [f"m{i}" for i in range(4)], then="cancel")
    every = page_ids(client, job_id)
    by_after = stream(client, job_id, params={"after": every[1]})
    assert [m["id"] for m in by_after[:-1]] == every[2:]
    # A reconnecting EventSource sends Last-Event-ID; it wins over the URL's `after`.
    resumed = stream(client, job_id, params={"after": every[0], "limit": 1}, headers={"Last-Event-ID": every[-2]})
    assert [m["id"] for m in resumed[:-1]] == every[-1:]


def test_unknown_cursor_and_foreign_job_are_refused(client: TestClient, job_id: str) -> None:
    url = f"/v1/fine_tuning/jobs/{job_id}/events"
    r = client.get(url, params={"stream": "true", "after": "ftevent-nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "after"
    r = client.get(url, params={"stream": "true"}, headers={"Last-Event-ID": "ftevent-nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID"
    _, stranger = create_user_with_key("stranger")
    r = client.get(url, params={"stream": "true"}, headers={"Authorization": f"Bearer {stranger}"})
    assert r.status_code == 404
    r = client.get(url, params={"stream": "true"}, headers={"Authorization": ""})
    assert r.status_code == 401


def test_keepalive_ping_while_nothing_happens(client: TestClient, job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.routes import events

    monkeypatch.setattr(events, "PING_S", 0.2)
    seen = []
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true", "limit": 1}) as r:
        for msg in sse_messages(r.iter_lines()):
            seen.append(msg)
            if "comment" in msg:
                break
    assert "id" in seen[0] and "comment" in seen[-1]  # the backlog, then a ping on a quiet stream


def test_a_stream_ends_soon_after_its_key_is_revoked(client: TestClient, job_id: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """teams.md: a revoked key stops working at once; an open stream must not go on sending the
    job's events until it ends."""
    from api.routes import events
    from core.db import session_scope
    from core.identity import revoke_key
    from core.models import ApiKey

    monkeypatch.setattr(events, "RECHECK_S", 0.3)
    user_id, key = create_user_with_key("watcher", "admin")
    got: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                       headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status_code == 200
        lines = sse_messages(r.iter_lines())
        got.append(next(m for m in lines if "id" in m))  # the backlog flows while the key is good
        with session_scope() as db:
            revoke_key(db, db.query(ApiKey).filter_by(user_id=user_id).one().id)
        t0 = time.monotonic()
        writer = threading.Thread(target=add_events, args=(job_id, [f"after {i}" for i in range(40)]),
                                  kwargs={"delay": 0.05})
        writer.start()
        try:
            got += [m for m in lines if "comment" not in m]
        finally:
            writer.join()
    assert time.monotonic() - t0 < 5
    assert got[-1]["event"] == "error", got[-1]
    assert json.loads(got[-1]["data"])["error"]["code"] == "invalid_api_key"
    leaked = [json.loads(m["data"])["message"] for m in got if "id" in m and "after" in m.get("data", "")]
    assert len(leaked) < 40, leaked  # the stream stopped before the job's later events
