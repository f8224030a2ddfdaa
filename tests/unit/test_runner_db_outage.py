"""A job's supervision rides out a database that goes away mid-flush."""

from __future__ import annotations

from types import SimpleNamespace

from sqlalchemy.exc import PendingRollbackError

from core.settings import Settings
from worker.runner import JobRun


class Session:
    def __init__(self) -> None:
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1


def test_a_connection_cut_during_a_flush_is_retried_after_a_rollback(tmp_path) -> None:
    """A cut in the middle of a flush surfaces as PendingRollbackError, not as the driver's error
    (seen when PostgreSQL restarted under the pump's commit): it too is an outage to ride out, and
    the rollback before the next attempt is what clears it."""
    db = Session()
    run = SimpleNamespace(settings=Settings(home=tmp_path, lease_ttl_s=60), db=db, job_id="ftjob-x")
    calls = []

    def pump() -> str:
        calls.append(db.rollbacks)
        if len(calls) == 1:
            raise PendingRollbackError("Can't reconnect until invalid transaction is rolled back")
        return "stored"

    assert JobRun.with_db(run, pump) == "stored"
    assert calls == [0, 1]  # the second attempt came after the rollback
