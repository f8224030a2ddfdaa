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


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    settings = settings or get_settings()
    if url.startswith("sqlite"):
        # The pool's size and wait apply here too: SQLite connections are cheap, but a pool that
        # runs dry shows the same way on both databases (requests wait, then fail). The overflow
        # is kept open rather than closed after each use: under load a SQLite file's connection
        # was opened (and its pragmas set) again for nearly every request.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=settings.db_pool_size + settings.db_max_overflow, max_overflow=0,
                               pool_timeout=settings.db_pool_timeout_s)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):  # noqa: ANN001
            # WAL lets the API read while a worker writes events; foreign keys are off by default.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_engine(
        url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s, pool_recycle=settings.db_pool_recycle_s,
        pool_pre_ping=settings.db_pool_pre_ping, connect_args={"connect_timeout": settings.db_connect_timeout_s},
    )
    retry_connect(engine, settings.db_connect_retry_s)
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
