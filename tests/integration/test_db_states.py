"""The state machine is the only way a status changes, and it refuses what the lifecycle forbids."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.jobs import request_cancel
from core.models import Job, JobEvent
from tests.integration.conftest import make_job

# Status changes are conditional UPDATEs: checked on both databases.
pytestmark = pytest.mark.dialects


def status_events(db: Session, job_id: str) -> list[tuple[str, str]]:
    rows = db.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "status")
                      .order_by(JobEvent.seq)).all()
    return [(e.data["from"], e.data["to"]) for e in rows if e.data and "from" in e.data]


@pytest.mark.parametrize(("start", "target"), [
    (states.QUEUED, states.SUCCEEDED),
    (states.QUEUED, states.CANCELLING),
    (states.SUCCEEDED, states.RUNNING),
    (states.FAILED, states.QUEUED),
    (states.CANCELLED, states.RUNNING),
    (states.PAUSED, states.RUNNING),
    (states.CANCELLING, states.RUNNING),
])
def test_illegal_transition_is_refused_and_leaves_no_trace(db: Session, start: str, target: str) -> None:
    job = make_job(db)
    job.status = start  # set directly to reach the start state; the transition under test is checked
    db.commit()
    before = db.scalar(select(JobEvent.seq).where(JobEvent.job_id == job.id).order_by(JobEvent.seq.desc()).limit(1))
    with pytest.raises(states.IllegalTransition, match=f"'{start}' to '{target}'"):
        states.transition(db, job, target)
    db.commit()
    db.expire_all()
    assert db.get(Job, job.id).status == start
    after = db.scalar(select(JobEvent.seq).where(JobEvent.job_id == job.id).order_by(JobEvent.seq.desc()).limit(1))
    assert after == before


def test_every_transition_is_an_event(db: Session) -> None:
    job = make_job(db)
    states.transition(db, job, states.RUNNING)
    states.transition(db, job, states.SUCCEEDED)
    db.commit()
    assert status_events(db, job.id) == [
        (states.VALIDATING, states.QUEUED), (states.QUEUED, states.RUNNING), (states.RUNNING, states.SUCCEEDED),
    ]
    assert job.finished_at is not None and job.started_at is not None


def test_cancel_of_a_queued_job_is_immediate(db: Session) -> None:
    job = make_job(db)
    request_cancel(db, job)
    db.commit()
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.status == states.CANCELLED and job.cancel_requested
    assert request_cancel(db, job).status == states.CANCELLED  # again: answered as it is (a client's retry)
    job.status = states.SUCCEEDED
    db.commit()
    with pytest.raises(states.IllegalTransition):
        request_cancel(db, job)  # a job that ended otherwise cannot be cancelled
