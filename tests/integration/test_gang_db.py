"""Gang placement in the database (core/gang.py): a job across hosts is leased together with all of
its hosts in one transaction, a host serves one gang at a time, and the hosts are freed when the
attempt ends, whichever way it ends."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import control, gang, states
from core.jobs import reap_stale
from core.models import GangMember, Job
from tests.integration.conftest import make_job

pytestmark = pytest.mark.dialects


def rows(db: Session) -> list[tuple[str, int, str]]:
    db.expire_all()
    out = [(m.job_id, m.node_rank, m.host) for m in db.scalars(select(GangMember).order_by(GangMember.job_id,
                                                                                           GangMember.node_rank))]
    db.rollback()
    return out


def test_two_jobs_across_the_same_hosts_cannot_each_hold_one(db: Session) -> None:
    one, two = make_job(db, nodes=2), make_job(db, nodes=2)
    led = gang.form(db, one.id, "w-a", "host-a", ["host-b"], 1)
    assert led is not None and led.status == states.RUNNING
    assert rows(db) == [(one.id, 0, "host-a"), (one.id, 1, "host-b")]
    # The second job, led from host B, would need host A: its lease and reservation fail together.
    assert gang.form(db, two.id, "w-b", "host-b", ["host-a"], 1) is None
    assert gang.form(db, two.id, "w-c", "host-c", ["host-b"], 1) is None  # B is taken even as a follower
    db.expire_all()
    assert db.get(Job, two.id).status == states.QUEUED and db.get(Job, two.id).lease_owner is None
    assert gang.busy_hosts(db) == {"host-a", "host-b"}
    assert gang.awaited_here(db, "host-b") and not gang.awaited_here(db, "host-a")
    assert gang.invitations(db, "host-b") == [gang.Invitation(one.id, 1, led.lease_attempt, 1)]
    assert gang.form(db, one.id, "w-c", "host-c", ["host-d"], 1) is None  # leased already


def test_a_follower_joins_heartbeats_and_learns_the_rendezvous(db: Session) -> None:
    job = make_job(db, nodes=2)
    led = gang.form(db, job.id, "w-a", "host-a", ["host-b"], 1)
    assert led is not None
    attempt = led.lease_attempt
    assert gang.join(db, job.id, 1, attempt, "w-b") and not gang.join(db, job.id, 1, attempt, "w-b2")
    standing = gang.beat(db, job.id, 1, attempt, "w-b")
    assert standing is not None and standing.endpoint is None and standing.nodes == 2
    gang.mark_ready(db, job.id, attempt, "10.0.0.5:29411", None)
    assert gang.beat(db, job.id, 1, attempt, "w-b").endpoint == "10.0.0.5:29411"
    assert gang.problem(db, job.id, attempt, ttl_s=30, join_by=time.time() + 60, exit_grace_s=10) is None
    # Silence past the lease TTL is a lost host; a busy host ends the attempt without a retry counted.
    found = gang.problem(db, job.id, attempt, ttl_s=-1, join_by=time.time() + 60, exit_grace_s=10)
    assert found is not None and "host-b stopped heartbeating" in found.message and found.counts
    gang.member_exited(db, job.id, 1, attempt, gang.GPUS_BUSY)
    found = gang.problem(db, job.id, attempt, ttl_s=30, join_by=time.time() + 60, exit_grace_s=10)
    assert found is not None and not found.counts


def test_a_host_that_never_joins_ends_the_attempt(db: Session) -> None:
    job = make_job(db, nodes=3)
    led = gang.form(db, job.id, "w-a", "host-a", ["host-b", "host-c"], 2)
    assert led is not None
    assert gang.join(db, job.id, 1, led.lease_attempt, "w-b")
    found = gang.problem(db, job.id, led.lease_attempt, ttl_s=30, join_by=time.time() - 1, exit_grace_s=10)
    assert found is not None and "host-c did not start" in found.message


@pytest.mark.parametrize("end", ["pause", "reaped", "cancel"])
def test_the_hosts_are_freed_however_the_attempt_ends(db: Session, end: str) -> None:
    job = make_job(db, nodes=2)
    led = gang.form(db, job.id, "w-a", "host-a", ["host-b"], 1)
    assert led is not None and rows(db)
    if end == "pause":
        control.request_pause(db, led)
        db.commit()
        states.transition(db, led, states.PAUSED, "paused")
    elif end == "reaped":
        led.lease_heartbeat_at = time.time() - 100
        db.commit()
        assert reap_stale(db, ttl_s=10) == [job.id]
    else:
        from core.jobs import request_cancel

        request_cancel(db, led)
        db.commit()
        assert rows(db), "still cancelling: the ranks are being stopped"
        states.transition(db, led, states.CANCELLED, "cancelled")
    db.commit()
    assert rows(db) == []
    # Another job can take the hosts now.
    other = make_job(db, nodes=2)
    assert gang.form(db, other.id, "w-b", "host-b", ["host-a"], 1) is not None
