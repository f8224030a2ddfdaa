"""Engine and sessions. SQLite (embedded) and PostgreSQL (production) behind one URL."""

from __future__ import annotations

import logging
import select
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, Insert, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core.settings import Settings, get_settings

# What a session raises when the database goes away: the driver's error, or, when the connection
# was cut in the middle of a flush, SQLAlchemy's refusal to go on until the session is rolled back
# (the driver's error is its cause). Both are over once the caller rolls back and tries again.
OUTAGE_ERRORS = (DBAPIError, PendingRollbackError)

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

    # A connection cut by the server (a restart, a terminated backend) is invalidated, and asking
    # for its info would try to revalidate it and raise PendingRollbackError from inside the very
    # rollback that recovers from the cut. Its transaction is gone, so there is nothing to count.
    @event.listens_for(engine, "commit")
    def _committed(conn):  # noqa: ANN001
        if not conn.invalidated:
            _bump(conn.info.pop("tables_written", ()))

    @event.listens_for(engine, "rollback")
    def _rolled_back(conn):  # noqa: ANN001
        if not conn.invalidated:
            conn.info.pop("tables_written", None)


def _bump(tables) -> None:  # noqa: ANN001
    for t in tables:
        _writes[t] = _writes.get(t, 0) + 1


def dialect_insert(db: Session, model: type) -> Insert:
    """INSERT of `model` with the session's database's ON CONFLICT support (PostgreSQL or SQLite)."""
    return (postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert)(model)


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
    if settings.db_pool_pre_ping:
        _ping_when_spoken(engine)
    _count_writes(engine)
    return engine


def _ping_when_spoken(engine: Engine) -> None:
    """The pool's pre-ping without a round trip while the server has said nothing.

    A pooled connection waits idle, and a server says nothing on an idle connection unless it
    ends it: a restart, a terminated backend or an idle timeout sends an error and closes the
    socket, which then has something to read. So a quiet socket is a live connection as far as a
    ping could tell (a host that vanished without closing would hang the ping as well; the pool's
    recycle covers those), and only a connection with something to read is pinged for real,
    which also clears whatever it was. The ping was a round trip on every checkout: for a polled
    read, one of its few statements.
    """
    ping = engine.dialect.do_ping

    def do_ping(dbapi_connection) -> bool:  # noqa: ANN001
        try:
            poller = select.poll()
            poller.register(dbapi_connection.pgconn.socket, select.POLLIN | select.POLLPRI)
            quiet = not dbapi_connection.closed and not poller.poll(0)
        except Exception:  # noqa: BLE001 - no socket to look at: ask the server
            quiet = False
        return True if quiet else ping(dbapi_connection)

    engine.dialect.do_ping = do_ping  # type: ignore[method-assign]


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


@lru_cache(maxsize=4)
def _reading(engine: Engine) -> Engine:
    # PostgreSQL: autocommit. SQLite's driver begins no transaction for a SELECT anyway.
    return engine.execution_options(isolation_level="AUTOCOMMIT") if engine.dialect.name == "postgresql" else engine


def read_session() -> Session:
    """A session for work that only reads (it must not write): on PostgreSQL its statements run
    without a transaction around them. Under READ COMMITTED, PostgreSQL's default and ours, each
    statement takes a snapshot of its own inside a transaction too, so a read sees the same rows;
    it saves the BEGIN and ROLLBACK round trips, for a polled read as many as its queries."""
    return get_sessionmaker()(bind=_reading(get_engine()))


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
