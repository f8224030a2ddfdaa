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
