"""The connection pool keeps the connections it opened: load around the pool's size must not open
a new connection (on PostgreSQL a new server process) at every burst."""

from __future__ import annotations

import pytest
from sqlalchemy import event, exc, text

from core.settings import Settings

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
