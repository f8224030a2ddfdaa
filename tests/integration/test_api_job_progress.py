"""The job object's `progress`: every field always present, figures from the latest metrics event."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.conftest import create_user_with_key
from tests.integration.conftest import make_job

FIELDS = {"step", "total_steps", "epoch", "train_loss", "tokens_per_second", "peak_memory_bytes", "mfu",
          "eta_seconds", "queue_position", "updated_at", "estimated_finish"}


@pytest.fixture
def client(db_env: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    _, key = create_user_with_key("admin", "admin")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def test_progress_of_queued_running_and_finished_jobs(client: TestClient, db: Session) -> None:
    from core import states

    first, second = make_job(db), make_job(db)
    p = client.get(f"/v1/fine_tuning/jobs/{second.id}").json()["progress"]
    assert FIELDS <= set(p) and p["queue_position"] == 2 and p["step"] is None and p["eta_seconds"] is None

    # What the worker leaves after a metrics event 10 s ago: its ETA then was 100 s.
    job = first
    job.status, job.started_at = states.RUNNING, time.time() - 60
    measured = time.time() - 10
    job.progress = {"step": 3, "total_steps": 12, "eta_seconds": 100.0, "retry_not_before": 0}
    states.add_event(db, job, "step 4/12 loss 1.5", type="metrics", created_at=measured, data={
        "step": 4, "total_steps": 12, "epoch": 0.5, "train_loss": 1.5, "tokens_per_second": 321.0,
        "peak_memory_bytes": 2**30, "mfu": 0.41})
    db.commit()
    got = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    p = got["progress"]
    assert (p["step"], p["total_steps"], p["epoch"], p["train_loss"]) == (4, 12, 0.5, 1.5)
    assert (p["tokens_per_second"], p["peak_memory_bytes"], p["mfu"]) == (321.0, 2**30, 0.41)
    assert 85 <= p["eta_seconds"] <= 91  # aged by the time since the event
    assert p["updated_at"] == pytest.approx(measured) and p["queue_position"] is None
    assert p["retry_not_before"] == 0  # the worker's own keys stay
    assert abs(got["estimated_finish"] - (time.time() + p["eta_seconds"])) <= 2
    # The second job moved up.
    assert client.get(f"/v1/fine_tuning/jobs/{second.id}").json()["progress"]["queue_position"] == 1
    listed = {j["id"]: j for j in client.get("/v1/fine_tuning/jobs").json()["data"]}
    assert listed[job.id]["progress"]["mfu"] == 0.41

    job.status, job.finished_at = states.SUCCEEDED, time.time()
    db.commit()
    p = client.get(f"/v1/fine_tuning/jobs/{job.id}").json()["progress"]
    assert p["eta_seconds"] == 0 and p["step"] == 4 and p["estimated_finish"] is None


@pytest.mark.parametrize("fair", [True, False], ids=["fair_share", "fifo"])
def test_a_page_of_queued_jobs_reads_the_queue_once_and_agrees_with_each_job(
        client: TestClient, db: Session, fair: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import event

    from core import scheduling
    from core.db import get_engine
    from core.models import User

    monkeypatch.setenv("TUNEQ_FAIR_SHARE", str(fair).lower())
    monkeypatch.setattr(scheduling, "PREFETCH", 2)  # so fair share reads the queue past its head
    users = [User(name=n) for n in ("ann", "ben")]
    db.add_all(users)
    db.commit()
    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        if not threading.current_thread().name.startswith("tuneq-"):  # not the API's own data checker
            statements.append(statement)

    def listed_after(n: int) -> tuple[int, dict[str, int]]:
        while len(ids) < n:  # alternate owners, so fair share interleaves them
            job = make_job(db, examples=2)
            job.owner_id = users[len(ids) % 2].id
            db.commit()
            ids.append(job.id)
        statements.clear()
        event.listen(get_engine(), "before_cursor_execute", count)
        try:
            page = client.get("/v1/fine_tuning/jobs", params={"limit": 50}).json()["data"]
        finally:
            event.remove(get_engine(), "before_cursor_execute", count)
        return len(statements), {j["id"]: j["progress"]["queue_position"] for j in page}

    ids: list[str] = []
    few, _ = listed_after(6)
    many, positions = listed_after(12)
    assert many == few, f"listing 12 queued jobs ran {many} queries, 6 ran {few}: the queue is read per job"
    assert sorted(positions.values()) == list(range(1, 13))
    for job_id, position in positions.items():
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["queue_position"] == position


def _statements_of(client: TestClient, path: str) -> tuple[list[str], dict]:
    """The SQL statements one request ran (the API's own data checker apart), and its answer."""
    from sqlalchemy import event

    from core.db import get_engine

    statements: list[str] = []

    def count(_conn, _cursor, statement, *_args) -> None:  # noqa: ANN001
        if not threading.current_thread().name.startswith("tuneq-"):
            statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        answer = client.get(path)
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    assert answer.status_code == 200, answer.text
    return statements, answer.json()


def _reads_queue(statements: list[str]) -> bool:
    """Whether the queue's order was read: fair share's use, or the queued jobs in priority order."""
    return any("gpu_usage" in s or "jobs.priority DESC" in s for s in statements)


def test_polling_a_queued_job_runs_two_queries_while_a_reading_of_the_queue_is_fresh(
        client: TestClient, db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each poll checks the key and reads the job (one query each); the queue's order, which takes
    several queries, is read once and shared until this process writes to it or it ages."""
    import sqlite3

    from core import scheduling
    from core.db import get_engine

    clock = [1000.0]
    monkeypatch.setattr(scheduling, "_clock", lambda: clock[0])
    first, second = make_job(db), make_job(db)
    statements, job = _statements_of(client, f"/v1/fine_tuning/jobs/{second.id}")
    assert job["progress"]["queue_position"] == 2 and _reads_queue(statements)
    for _ in range(3):
        statements, job = _statements_of(client, f"/v1/fine_tuning/jobs/{second.id}")
        assert len(statements) == 2 and not _reads_queue(statements), statements
        assert job["progress"]["queue_position"] == 2

    # A change made through this process shows at once: the first job leaves the queue.
    first.status = "cancelled"
    db.commit()
    statements, job = _statements_of(client, f"/v1/fine_tuning/jobs/{second.id}")
    assert job["progress"]["queue_position"] == 1 and _reads_queue(statements)

    # A job queued by another process (not in the reading) gets a reading of its own.
    if get_engine().dialect.name != "sqlite":
        return
    third = make_job(db)
    third_id = third.id
    _statements_of(client, f"/v1/fine_tuning/jobs/{third_id}")  # the reading holds the third job now
    with sqlite3.connect(get_engine().url.database) as other:  # another process's write
        other.execute("UPDATE jobs SET priority = 5 WHERE id = ?", (third_id,))
    assert _statements_of(client, f"/v1/fine_tuning/jobs/{third_id}")[1]["progress"]["queue_position"] == 2
    clock[0] += 1.5  # older than TUNEQ_API_QUEUE_POSITION_MAX_AGE_S (1 s): read again
    assert _statements_of(client, f"/v1/fine_tuning/jobs/{third_id}")[1]["progress"]["queue_position"] == 1


def test_a_zero_max_age_reads_the_queue_per_request(db_env: dict[str, str], db: Session,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_API_QUEUE_POSITION_MAX_AGE_S", "0")
    reset_caches()
    _, key = create_user_with_key("admin", "admin")
    job = make_job(db)
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        for _ in range(2):
            statements, got = _statements_of(c, f"/v1/fine_tuning/jobs/{job.id}")
            assert got["progress"]["queue_position"] == 1 and _reads_queue(statements)


def test_a_revoked_key_is_refused_at_the_next_request(client: TestClient, db_env: dict[str, str]) -> None:
    """The key is checked against the database on every request (one query, no cache that
    would let a revoked key work on for a while)."""
    from core.db import session_scope
    from core.identity import revoke_key

    _, key = create_user_with_key("bob")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 200
    with session_scope() as s:
        revoke_key(s, f"key-{key.split('_')[1]}")  # tq_<key id>_<secret>
    assert client.get("/v1/fine_tuning/jobs", headers=headers).status_code == 401


@pytest.mark.dialects
def test_a_page_of_running_jobs_reads_their_latest_metrics_in_one_query(client: TestClient, db: Session) -> None:
    from core import states

    def running_job(step: int | None) -> str:
        job = make_job(db)
        job.status, job.started_at = states.RUNNING, time.time()
        if step is not None:
            for s in range(1, step + 1):  # older metrics and a later non-metrics event
                states.add_event(db, job, f"step {s}", type="metrics", data={"step": s, "train_loss": 1.0 / s})
            states.add_event(db, job, "a message", type="message")
        db.commit()
        return job.id

    def listed() -> tuple[int, dict[str, dict]]:
        statements, page = _statements_of(client, "/v1/fine_tuning/jobs?limit=50")
        return sum("job_events" in s for s in statements), {j["id"]: j["progress"] for j in page["data"]}

    steps = {running_job(n): n for n in (1, 2, 3)}
    few, _ = listed()
    steps |= {running_job(n): n for n in (4, 5, None)}
    many, progress = listed()
    assert few == many == 1, f"3 running jobs read job_events {few} times, 6 read it {many} times"
    for job_id, step in steps.items():
        assert progress[job_id]["step"] == step
        assert progress[job_id]["train_loss"] == (None if step is None else pytest.approx(1.0 / step))
        # The single GET agrees.
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["progress"]["step"] == step
