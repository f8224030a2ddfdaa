"""GET /metrics: Prometheus figures read from the database and Redis at scrape time, for admins."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from tests.conftest import create_user_with_key
from tests.integration.conftest import make_job


@pytest.fixture
def client(db_env: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    _, key = create_user_with_key("ops", "admin")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def scrape(client: TestClient) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


# Durations, CASE buckets and a JSON field summed in SQL: both databases.
@pytest.mark.dialects
def test_metrics_count_jobs_workers_durations_and_tokens(client: TestClient, db: Session) -> None:
    from core import states, workers
    from core.models import Job

    empty = scrape(client)
    assert empty["tuneq_queue_depth"][()] == 0 and empty["tuneq_tokens_trained_total"][()] == 0
    assert empty["tuneq_jobs"][(("status", "queued"),)] == 0 and empty["tuneq_workers"][()] == 0

    jobs = [make_job(db) for _ in range(5)]  # all queued
    # Two ran: one for 100 s and succeeded, one for 2000 s and failed; one runs on w1 with 2 GPUs.
    for job, status, seconds, tokens in ((jobs[0], states.SUCCEEDED, 100, 1000), (jobs[1], states.FAILED, 2000, 500)):
        job.status, job.started_at, job.finished_at = status, 1_000_000.0, 1_000_000.0 + seconds
        job.metrics = {"tokens": tokens, "train_loss": 1.0}
    jobs[2].status, jobs[2].lease_owner, jobs[2].gpus = states.RUNNING, "w1", 2
    jobs[2].metrics = {"tokens": 250}
    db.commit()
    workers.register("w1", "gpu-01", 4, "gpu", ttl_s=30, slots=4, free=2)
    workers.register("w2", "gpu-02", 8, "gpu", ttl_s=30, slots=8, free=8)

    m = scrape(client)
    assert m["tuneq_queue_depth"][()] == 2
    jobs_by = {dict(k)["status"]: v for k, v in m["tuneq_jobs"].items()}
    assert jobs_by == {"validating_files": 0, "queued": 2, "running": 1, "paused": 0, "cancelling": 0,
                       "succeeded": 1, "failed": 1, "cancelled": 0}
    assert m["tuneq_tokens_trained_total"][()] == 1750
    assert m["tuneq_workers"][()] == 2 and m["tuneq_redis_up"][()] == 1
    assert m["tuneq_worker_gpus"] == {(("host", "gpu-01"), ("kind", "gpu"), ("worker", "w1")): 4,
                                      (("host", "gpu-02"), ("kind", "gpu"), ("worker", "w2")): 8}
    assert m["tuneq_worker_gpus_busy"] == {(("host", "gpu-01"), ("worker", "w1")): 2,
                                           (("host", "gpu-02"), ("worker", "w2")): 0}
    buckets = {(dict(k)["status"], dict(k)["le"]): v for k, v in m["tuneq_job_duration_seconds_bucket"].items()}
    assert buckets[("succeeded", "60.0")] == 0 and buckets[("succeeded", "300.0")] == 1
    assert buckets[("failed", "1800.0")] == 0 and buckets[("failed", "3600.0")] == 1
    assert buckets[("failed", "+Inf")] == buckets[("succeeded", "+Inf")] == 1
    assert m["tuneq_job_duration_seconds_sum"][(("status", "failed"),)] == 2000
    assert m["tuneq_job_duration_seconds_count"][(("status", "succeeded"),)] == 1

    # Another API process sees the same figures: nothing is kept in the process.
    from api.main import create_app

    with TestClient(create_app(), headers=dict(client.headers)) as other:
        assert scrape(other)["tuneq_jobs"] == m["tuneq_jobs"]
    assert db.get(Job, jobs[3].id).status == states.QUEUED


def test_metrics_need_an_admin_key(client: TestClient) -> None:
    _, member = create_user_with_key("someone", "member")
    assert client.get("/metrics", headers={"Authorization": f"Bearer {member}"}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
