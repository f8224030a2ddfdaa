"""Priorities are bounded by policy: a member cannot jump the queue or preempt another team.

An admin grants a team, or one user, a higher cap; without a grant a user's jobs stay in the
default band, which preempts only the same team's jobs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.conftest import client_for, create, upload


@pytest.fixture
def blue(service_env):  # noqa: ANN001, ANN201
    with client_for("bob", "member", "blue") as c:
        yield c


def test_priority_above_the_cap_is_403_naming_priority(blue, admin, limits) -> None:  # noqa: ANN001
    limits(max_gpus_per_user=64, max_active_jobs_per_user=64)
    f = upload(blue)
    r = create(blue, f, priority=100)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["param"] == "priority" and err["code"] == "priority_above_cap" and "cap of 0" in err["message"]
    assert create(blue, f, priority=1).status_code == 403
    # The default band: 0 and any lower priority.
    assert create(blue, f, priority=0).status_code == 200
    assert create(blue, f, priority=-50).status_code == 200

    # A grant to the team, then to one user above it; admins may ask for any priority.
    assert admin.patch("/v1/admin/teams/blue", json={"max_priority": 50}).json()["max_priority"] == 50
    assert create(blue, f, priority=50).status_code == 200
    assert create(blue, f, priority=51).status_code == 403
    me = next(u for u in admin.get("/v1/admin/users").json()["data"] if u["name"] == "bob")
    assert me["priority_cap"] == 50
    assert admin.patch(f"/v1/admin/users/{me['id']}", json={"max_priority": 80}).json()["priority_cap"] == 80
    assert create(blue, f, priority=80).status_code == 200
    assert create(admin, upload(admin), priority=100).status_code == 200
    # A member cannot grant themselves anything.
    assert blue.patch(f"/v1/admin/users/{me['id']}", json={"max_priority": 100}).status_code == 403
    assert admin.patch("/v1/admin/teams/blue", json={"max_priority": 101}).status_code == 400


def _running_and_waiting(owners: tuple[str, str], priorities: tuple[int, int]) -> tuple[str, str]:
    """A running job of owners[0] and a queued one of owners[1], in the current test database."""
    from core import states
    from core.db import session_scope
    from core.jobs import create_job
    from tests.integration.conftest import chat_lines, store_file

    ids = []
    with session_scope() as db:
        f = store_file(db, chat_lines(4))
        for owner, priority in zip(owners, priorities, strict=True):
            job = create_job(db, spec={"model": "tiny-llama", "training_file": f.id}, model="tiny-llama", method="lora",
                             training_file=f, owner_id=owner, priority=priority)
            ids.append(job.id)
        db.flush()
        states.transition(db, db.get(type(job), ids[0]), states.RUNNING, "running")
    return ids[0], ids[1]


@pytest.mark.parametrize(("victim_team", "head_priority", "preempts"), [
    ("red", 0, False),    # the default band never preempts another team
    ("blue", 0, True),    # within a team, priority orders as always
    ("red", 50, True),    # a granted priority above the band does
])
def test_the_default_band_preempts_only_its_own_team(service_env, limits, tmp_path: Path, victim_team: str,  # noqa: ANN001
                                                    head_priority: int, preempts: bool) -> None:
    from core.db import session_scope
    from core.scheduling import waiting
    from tests.conftest import create_user_with_key
    from worker.gpus import GpuPool
    from worker.placement import preempt_for

    victim, _ = create_user_with_key("victim", "member", victim_team)
    head, _ = create_user_with_key("head", "member", "blue")
    running, queued = _running_and_waiting((victim, head), (-10, head_priority))
    pool = GpuPool(1, tmp_path / "locks", kind="gpu")
    held = pool.reserve(1, owner=running)  # kept: the lock goes with the object
    assert held is not None
    with session_scope() as db:
        asked = preempt_for(db, pool, waiting(db), pool.free())
    assert asked == ([running] if preempts else [])


@pytest.mark.parametrize(("second_priority", "reserve_after_h", "preempts"), [
    (0, 4, True),     # as high as the head, and of the running job's team: it preempts, and gets the GPU
    (-5, 4, False),   # lower than the head: the head would take the GPU it frees
    (0, 0, False),    # no reservations: the freed GPU could not be kept from the head
])
def test_a_job_behind_a_head_that_may_not_preempt_may(service_env, limits, tmp_path: Path,  # noqa: ANN001
                                                      second_priority: int, reserve_after_h: float,
                                                      preempts: bool) -> None:
    """Red's low job runs; blue's job heads the queue but may not pause red's; red's own job of the
    same priority behind it may, and the GPU that frees goes to red's job, not to blue's."""
    from core import control, states
    from core.db import session_scope
    from core.jobs import create_job
    from core.models import Job
    from core.scheduling import waiting
    from core.settings import get_settings
    from tests.conftest import create_user_with_key
    from tests.integration.conftest import chat_lines, store_file
    from worker.gpus import GpuPool
    from worker.placement import preempt_for, take

    limits(fair_share=False, reserve_after_h=reserve_after_h)  # the queue in creation order
    red, _ = create_user_with_key("red-low", "member", "red")
    blue, _ = create_user_with_key("blue-head", "member", "blue")
    red2, _ = create_user_with_key("red-next", "member", "red")
    with session_scope() as db:
        f = store_file(db, chat_lines(4))
        running, head, second = (
            create_job(db, spec={"model": "tiny-llama", "training_file": f.id}, model="tiny-llama", method="lora",
                       training_file=f, owner_id=owner, priority=priority).id
            for owner, priority in ((red, -10), (blue, 0), (red2, second_priority)))
        db.flush()
        states.transition(db, db.get(Job, running), states.RUNNING, "running")
    pool = GpuPool(1, tmp_path / "locks", kind="gpu")
    held = pool.reserve(1, owner=running)
    assert held is not None
    with session_scope() as db:
        assert [w.id for w in waiting(db)] == [head, second]
        assert preempt_for(db, pool, waiting(db), pool.free()) == ([running] if preempts else [])
        assert db.get(Job, second).reserved_host == (pool.host if preempts else None)
    if not preempts:
        return
    with session_scope() as db:  # the victim's worker: paused at a checkpoint, re-queued, GPU unlocked
        victim = db.get(Job, running)
        victim.pause_requested = False
        states.transition(db, victim, states.PAUSED, "Job paused.")
        control.after_pause(db, victim)
    pool.release(held)
    with session_scope() as db:
        taken = take(db, pool, head, "worker-1", get_settings())  # the head's delivery comes first
        assert not isinstance(taken, str), taken
        job, reservation = taken
        assert job.id == second and job.status == states.RUNNING and job.reserved_host is None
        pool.release(reservation)
