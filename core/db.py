"""Engine and sessions. SQLite (embedded) and PostgreSQL (production) behind one URL."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Committed writes per table by this process (any engine): a cache of what a table held (the API's
# reading of the queue) is stale once its table's count moved. Writes by other processes do not
# count here; such a cache bounds those by its age.
_writes: dict[str, int] = {}


def writes_to(*tables: str) -> int:
    """How many transactions of this process that wrote to any of `tables` have committed."""
    return sum(_writes.get(t, 0) for t in tables)


def _count_writes(engine: Engine) -> None:
    """Note the tables a transaction writes to, and count them when it commits (also just before:
    a reader that runs between the write and the commit must not keep what it read)."""

    @event.listens_for(engine, "after_cursor_execute")
    def _written(conn, _cursor, _statement, _params, context, _many):  # noqa: ANN001
        if context is not None and (context.isinsert or context.isupdate or context.isdelete):
            table = getattr(getattr(context.compiled, "statement", None), "table", None)
            if table is not None:
                conn.info.setdefault("tables_written", set()).add(table.name)
                _bump(conn.info["tables_written"])

    @event.listens_for(engine, "commit")
    def _committed(conn):  # noqa: ANN001
        _bump(conn.info.pop("tables_written", ()))

    @event.listens_for(engine, "rollback")
    def _rolled_back(conn):  # noqa: ANN001
        conn.info.pop("tables_written", None)


def _bump(tables) -> None:  # noqa: ANN001
    for t in tables:
        _writes[t] = _writes.get(t, 0) + 1


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    # A process opens connections as it needs them, up to the pool's size and overflow together,
    # and keeps them: a pool that closes each overflow connection as it comes back opens a new
    # one at the next burst. Under a steady load whose concurrency hovers around the pool's size
    # that was a new connection for many requests: on PostgreSQL a new server process, its
    # catalog caches cold, several times a request's own work on both sides; on SQLite the file
    # opened again and its pragmas set.
    pool = {"pool_size": settings.db_pool_size + settings.db_max_overflow, "max_overflow": 0,
            "pool_timeout": settings.db_pool_timeout_s}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # noqa: ANN001
            # WAL lets the API read while a worker writes events; foreign keys are off by default.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        _count_writes(engine)
        return engine
    engine = create_engine(
        url, **pool, pool_recycle=settings.db_pool_recycle_s, pool_pre_ping=settings.db_pool_pre_ping,
        connect_args={"connect_timeout": settings.db_connect_timeout_s},
    )
    retry_connect(engine, settings.db_connect_retry_s)
    _count_writes(engine)
    return engine


def retry_connect(engine: Engine, within_s: float) -> None:
    """Retry refused connections for a while: a database restart then costs callers a pause, not an error.

    Only opening a connection is retried here; it changes nothing on the server, so it is safe
    for any caller. A statement cut off by the restart still fails and is the caller's to retry
    (the worker's DB calls, the API's idempotent reads).
    """
    if within_s <= 0:
        return
    retrying = Retrying(
        retry=retry_if_exception_type(engine.dialect.loaded_dbapi.OperationalError),
        stop=stop_after_delay(within_s), wait=wait_exponential(multiplier=0.1, max=2), reraise=True,
        before_sleep=lambda rs: log.warning("database connection failed, retrying: %s", rs.outcome.exception()),
    )

    @event.listens_for(engine, "do_connect")
    def _connect(dialect, _record, cargs, cparams):  # noqa: ANN001, ANN202
        return retrying(dialect.connect, *cargs, **cparams)


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url())


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
