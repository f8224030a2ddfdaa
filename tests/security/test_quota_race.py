"""A user's job quota holds under concurrent creations, on SQLite and on PostgreSQL.

The quota's count and the job's insert must be one atomic step: 50 requests at once, each the
last free slot's candidate, may leave no more unfinished jobs (and GPUs asked for) than allowed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from tests.security.conftest import create, upload

CONCURRENT = 50


def test_concurrent_creations_respect_the_quota(limits, member, service_env) -> None:  # noqa: ANN001
    from core.db import session_scope
    from core.models import Job

    limits(max_active_jobs_per_user=10, max_gpus_per_user=8, job_create_rate=10_000)
    f = upload(member)
    member.get("/v1/fine_tuning/jobs")  # warm the tokenizer and planner caches, so requests overlap
    with ThreadPoolExecutor(CONCURRENT) as pool:
        codes = list(pool.map(lambda _: create(member, f).status_code, range(CONCURRENT)))
    with session_scope() as db:
        active = db.scalar(select(func.count(Job.id)))
        gpus = db.scalar(select(func.sum(Job.gpus)))
    assert sorted(set(codes)) == [200, 403], codes
    assert codes.count(200) == active == 8, (codes, active)  # the GPU cap binds first: 8 of 1 GPU each
    assert gpus == 8


def test_quota_check_and_insert_are_one_step(service_env, limits) -> None:  # noqa: ANN001
    """Every creation counts at the same instant (a barrier): only the lock keeps the count true."""
    import threading

    from sqlalchemy.orm import Session

    from core.db import make_engine, session_scope
    from core.jobs import create_job
    from core.limits import LimitExceeded, check_job_quota
    from core.models import File, Job, User
    from core.settings import get_settings
    from tests.conftest import create_user_with_key
    from tests.integration.conftest import chat_lines, store_file

    limits(max_active_jobs_per_user=10, max_gpus_per_user=64)
    user_id, _ = create_user_with_key("racer")
    with session_scope() as db:
        file_id = store_file(db, chat_lines(4)).id
    settings = get_settings()
    barrier = threading.Barrier(CONCURRENT)

    def admit(_: int) -> str:
        # An engine per thread: a shared pool has fewer connections than threads at the barrier.
        engine = make_engine(service_env["TUNEQ_DATABASE_URL"])
        db = Session(engine)
        try:
            user, training = db.get(User, user_id), db.get(File, file_id)
            barrier.wait(timeout=60)
            check_job_quota(db, user, 1, settings)
            create_job(db, spec={"model": "tiny-llama", "training_file": file_id}, model="tiny-llama", method="lora",
                       training_file=training, owner_id=user_id)
            db.commit()
            return "created"
        except LimitExceeded as exc:
            db.rollback()
            return exc.code
        finally:
            db.close()
            engine.dispose()

    with ThreadPoolExecutor(CONCURRENT) as pool:
        outcomes = list(pool.map(admit, range(CONCURRENT)))
    with session_scope() as db:
        active = db.scalar(select(func.count(Job.id)))
    assert outcomes.count("created") == active == 10, (outcomes, active)


# The user's row lock is what serialises them on PostgreSQL: both databases.
@pytest.mark.dialects
def test_concurrent_resumes_and_creations_respect_the_quota(limits, member, service_env) -> None:  # noqa: ANN001
    """Paused jobs hold no GPUs; resuming them while new jobs are created, all at once, may leave
    no more GPUs asked for than allowed: a resume counts under the lock a creation takes."""
    from core.db import session_scope
    from core.limits import HOLDING_GPUS
    from core.models import Job

    limits(max_active_jobs_per_user=20, max_gpus_per_user=8, job_create_rate=10_000)
    f = upload(member)
    paused = [create(member, f).json()["id"] for _ in range(8)]
    for job_id in paused:
        assert member.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"

    def resume_or_create(i: int) -> int:
        if i % 2:
            return member.post(f"/v1/fine_tuning/jobs/{paused[i // 2]}/resume").status_code
        return create(member, f).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(resume_or_create, range(16)))
    with session_scope() as db:
        gpus = db.scalar(select(func.sum(Job.gpus)).where(Job.status.in_(HOLDING_GPUS)))
    assert sorted(set(codes)) == [200, 403], codes
    assert codes.count(200) == gpus == 8, (codes, gpus)
