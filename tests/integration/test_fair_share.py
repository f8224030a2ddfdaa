"""Fair share on the real database: use is recorded as jobs hold GPUs, and the queue order that
workers follow and users see puts the least-used team and user first."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import scheduling, states
from core.jobs import acquire_lease, heartbeat
from core.models import GpuUsage, Job, Team, User, now
from core.scheduling import pick, queue_position, waiting
from tests.conftest import reset_caches
from tests.integration.conftest import make_job

# Usage rows are inserted with ON CONFLICT and updated under row locks: both databases.
pytestmark = pytest.mark.dialects


def people(db: Session) -> dict[str, User]:
    vision, nlp = Team(name="vision"), Team(name="nlp")
    db.add_all([vision, nlp])
    db.flush()
    users = {n: User(name=n, team_id=t.id) for n, t in (("alice", vision), ("bob", vision), ("carol", nlp))}
    db.add_all(users.values())
    db.commit()
    return users


def queued(db: Session, owner: User, n: int) -> list[str]:
    out = []
    for _ in range(n):
        job = make_job(db, examples=2)
        job.owner_id = owner.id
        out.append(job.id)
    db.commit()
    return out


def usage(db: Session) -> dict[str, float]:
    db.expire_all()
    return {r.principal: r.gpu_hours for r in db.scalars(select(GpuUsage))}


@pytest.mark.parametrize("fair", [True, False], ids=["fair_share", "fifo"])
def test_a_colleagues_job_runs_before_a_flood_and_the_queue_position_agrees(
        db: Session, fair: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQ_FAIR_SHARE", str(fair).lower())
    monkeypatch.setattr(scheduling, "PREFETCH", 3)  # workers read each user's 3 oldest jobs, then the rest
    reset_caches()
    u = people(db)
    flood = queued(db, u["alice"], 12)
    bob = queued(db, u["bob"], 1)[0]
    # Alice's first job runs (on the only GPU) and has used two GPU-hours by the time it ends.
    first = pick(waiting(db), free=1, total=1)
    assert first is not None and first.id == flood[0]
    assert acquire_lease(db, first.id, "w1", ttl_s=30) is not None
    db.execute(update(Job).where(Job.id == first.id).values(usage_charged_at=now() - 2 * 3600))
    job = db.get(Job, first.id, populate_existing=True)
    states.transition(db, job, states.SUCCEEDED, "done")
    db.commit()
    # The next free GPU: the worker's choice and the positions users see agree.
    order = [w.id for w in waiting(db)]
    nxt = pick(waiting(db), free=1, total=1)
    assert nxt is not None and nxt.id == order[0]
    bob_job = db.get(Job, bob)
    if fair:
        assert usage(db)[f"user:{u['alice'].id}"] == pytest.approx(2.0, rel=0.01)
        assert usage(db)[f"team:{u['alice'].team_id}"] == pytest.approx(2.0, rel=0.01)
        assert nxt.id == bob and queue_position(db, bob_job) == 1
        assert order[1:] == flood[1:]  # FIFO within alice's jobs, past the part read first
        assert len(waiting(db)) == 12 and queue_position(db, db.get(Job, flood[-1])) == 12
    else:
        assert nxt.id == flood[1] and queue_position(db, bob_job) == 12


def test_the_least_used_team_goes_first_and_running_jobs_accrue(db: Session) -> None:
    u = people(db)
    a = queued(db, u["alice"], 2)
    c = queued(db, u["carol"], 1)
    # Oldest first while nobody has used anything: alice's (team vision) job, then carol's (nlp).
    assert [w.id for w in waiting(db)][:2] == [a[0], c[0]]
    # Alice's job runs; a lease renewal charges what it used so far, and it keeps running.
    assert acquire_lease(db, a[0], "w1", ttl_s=30) is not None
    db.execute(update(Job).where(Job.id == a[0]).values(usage_charged_at=now() - 600, gpus=2))
    db.commit()
    job = heartbeat(db, a[0], "w1", attempt=1)
    assert job is not None and job.usage_charged_at is not None and job.usage_charged_at > now() - 60
    used = usage(db)
    assert used[f"user:{u['alice'].id}"] == pytest.approx(2 * 600 / 3600, rel=0.05)
    assert used[f"team:{u['alice'].team_id}"] == pytest.approx(2 * 600 / 3600, rel=0.05)
    # Team vision runs and has used GPUs: team nlp's carol is served before alice's next job.
    assert [w.id for w in waiting(db)] == [c[0], a[1]]
    # A renewal right after charges nothing twice.
    heartbeat(db, a[0], "w1", attempt=1)
    assert usage(db) == used


def test_a_running_jobs_use_counts_in_the_order_before_its_next_renewal(db: Session) -> None:
    from core.fairshare import usage_now

    u = people(db)
    a = queued(db, u["alice"], 2)
    b = queued(db, u["bob"], 1)
    # Alice's 2-GPU job has run for 3 hours since it was last charged (no renewal since).
    assert acquire_lease(db, a[0], "w1", ttl_s=30) is not None
    t = now()
    db.execute(update(Job).where(Job.id == a[0]).values(usage_charged_at=t - 3 * 3600, gpus=2))
    db.commit()
    use = usage_now(db, t)
    # 6 GPU-hours used, plus the use still expected of its 2 GPUs (fair_share_job_gpu_hours each).
    assert use[f"user:{u['alice'].id}"] == pytest.approx(6.0 + 2.0, rel=0.01)
    assert use[f"team:{u['alice'].team_id}"] == pytest.approx(8.0, rel=0.01)
    # Bob (same team, nothing used) goes before alice's next job; carol's team has used nothing.
    assert [w.id for w in waiting(db)] == [b[0], a[1]]
    assert use.get(f"user:{u['bob'].id}", 0.0) == 0.0
