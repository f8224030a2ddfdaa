"""Database connections under a steady load: the pool keeps the connections it opened (load around
its size must not open a new one, on PostgreSQL a new server process, at every burst), and on
PostgreSQL a polled read sends its queries and nothing else (no pre-ping, BEGIN or ROLLBACK)
while a connection the server ended is still replaced before use."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path

import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.orm import Session

from core.settings import Settings
from tests.conftest import create_user_with_key
from tests.integration.conftest import make_job

pytestmark = pytest.mark.dialects


def test_bursts_past_the_pool_size_open_their_connections_once(db_env: dict[str, str]) -> None:
    from core.db import make_engine

    engine = make_engine(db_env["TUNEQ_DATABASE_URL"], Settings(db_pool_size=2, db_max_overflow=3, db_pool_timeout_s=0.2))
    opened: list[object] = []
    event.listen(engine, "connect", lambda dbapi_conn, _record: opened.append(dbapi_conn))
    try:
        for _ in range(3):  # three bursts of five at once, each past the pool size of two
            burst = [engine.connect() for _ in range(5)]
            for c in burst:
                assert c.execute(text("select 1")).scalar() == 1
            for c in burst:
                c.close()
        assert len(opened) == 5, "the second and third bursts reuse the first one's connections"
        # The limit is still the pool size and the overflow together.
        held = [engine.connect() for _ in range(5)]
        with pytest.raises(exc.TimeoutError):
            engine.connect()
        for c in held:
            c.close()
    finally:
        engine.dispose()


def _round_trips(trace: str) -> list[str]:
    """What a libpq trace shows the client sent, one entry per round trip: a simple query (BEGIN,
    ROLLBACK) or an extended one, up to its Sync."""
    messages = re.findall(r"^F\t\d+\t(Query|Parse|Sync)\t?(.*?)(?=^[FB]\t)", trace + "F\t", re.M | re.S)
    sent, pending = [], ""
    for kind, body in messages:
        if kind == "Query":
            sent.append(body.strip())
        elif kind == "Parse":
            pending = body.strip()
        else:
            sent.append(pending)
            pending = ""
    return sent


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_polled_read_on_postgresql_sends_its_queries_and_nothing_else(
        db_env: dict[str, str], db: Session, tmp_path: Path) -> None:
    """No pre-ping round trip on a quiet pooled connection, no BEGIN and ROLLBACK around a read:
    a poll of a queued job is the key's query and the job's, while the queue's reading is fresh."""
    import psycopg

    from api.deps import read_in_one_hop
    from api.routes.jobs import _read_job
    from core.db import get_engine

    job = make_job(db)
    db.close()
    _, key = create_user_with_key("poller", "admin")
    engine = get_engine()
    engine.dispose()  # every connection from now on is traced
    opened: list[object] = []
    event.listen(engine, "connect", lambda dbapi_conn, _record: opened.append(dbapi_conn))
    settings = Settings(api_queue_position_max_age_s=60)

    def poll() -> dict:
        return json.loads(asyncio.run(read_in_one_hop(_read_job, key, job.id, settings)).body)

    def traced(path: Path | None) -> None:
        for conn in opened:
            conn.pgconn.untrace()  # flushes what it wrote
            if path is not None:
                conn.pgconn.trace(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
                conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)

    try:
        assert poll()["progress"]["queue_position"] == 1  # opens the pool's connection, reads the queue
        assert len(opened) == 1
        traced(tmp_path / "poll.trace")
        assert poll()["progress"]["queue_position"] == 1
        traced(None)
        sent = _round_trips((tmp_path / "poll.trace").read_text())
        assert len(sent) == 2, sent
        assert "api_keys" in sent[0] and "FROM jobs" in sent[1], sent
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_pooled_connection_the_server_ended_is_replaced_before_use(db_env: dict[str, str]) -> None:
    """The pre-ping asks the server only when a pooled connection has something to read: a
    backend ended by the server (a restart, pg_terminate_backend) must still be noticed."""
    import psycopg

    from core.db import get_engine, read_session

    with read_session() as s:
        first = s.scalar(text("select pg_backend_pid()"))
    url = get_engine().url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as other:  # beside the pool
        assert other.execute("select pg_terminate_backend(%s)", (first,)).fetchone()[0]
        for _ in range(100):  # until the backend has exited (its goodbye is then on the socket)
            if not other.execute("select 1 from pg_stat_activity where pid = %s", (first,)).fetchone():
                break
            time.sleep(0.05)
    with read_session() as s:
        assert s.scalar(text("select pg_backend_pid()")) != first
