"""Job creation does not tokenize in the request: a job too large to check at once waits in
`validating_files`, then goes to `queued`, or `failed` with the report a quick check gives."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import wait_for

pytestmark = pytest.mark.timeout(900)  # building the tiny model on a busy machine is most of it

CHAT = {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app with every data check in the background (no file is small enough to check at once)."""
    from api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_DATA_CHECK_INLINE_BYTES", "0")
    reset_caches()
    with TestClient(create_app(), headers=admin_headers) as c:
        yield c


@pytest.fixture
def no_tokenizing_here(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record any tokenization done in this (the API's) process; the checking child is another."""
    from api import data_check

    calls: list[Any] = []
    real = data_check.token_report

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(data_check, "token_report", recorded)
    return calls


def upload(c: TestClient, rows: list[dict]) -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = c.post("/v1/files", files={"file": ("f.jsonl", body, "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def settled(c: TestClient, job_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        return job if job["status"] != "validating_files" else None

    return wait_for(done, 180, f"the data check of {job_id}", interval=0.2)


def test_creation_answers_at_once_and_the_check_queues_the_job(client: TestClient, no_tokenizing_here: list[Any]) -> None:
    train = upload(client, [CHAT] * 8)
    t0 = time.monotonic()
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train,
                                                  "hyperparameters": {"max_seq_len": 32}})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "validating_files"
    assert time.monotonic() - t0 < 5  # no tokenizer in the request (the first check alone starts a child)
    job = settled(client, r.json()["id"])
    assert job["status"] == "queued", job
    assert not no_tokenizing_here, "the request's process tokenized the file"
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    check = next(e for e in events if e["kind"] == "data_check")
    assert check["data"]["training_file"]["examples"] == 8 and check["data"]["training_file"]["tokens"] > 0
    assert [e["data"]["to"] for e in events if e["kind"] == "status"] == ["queued", "validating_files"]

    # The token report is kept by file content and tokenizer: the next job of this file is
    # checked at once from it, without tokenizing again.
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train,
                                                  "hyperparameters": {"max_seq_len": 32}})
    assert r.status_code == 200 and r.json()["status"] == "queued", r.text
    assert not no_tokenizing_here


def test_a_file_the_job_cannot_use_fails_the_job_with_the_line_numbered_report(client: TestClient) -> None:
    chat = upload(client, [CHAT] * 2)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": chat, "data_format": "text"})
    assert r.status_code == 200 and r.json()["status"] == "validating_files", r.text
    job = settled(client, r.json()["id"])
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_file" and job["error"]["param"] == "training_file"
    assert f"training_file: file {chat} has 2 line(s) this job cannot use: line 1:" in job["error"]["message"]


def test_a_job_left_validating_by_a_dead_api_process_is_checked_by_another(
    service_env: dict[str, str], admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from api import validation
    from api.main import create_app
    from core.db import session_scope
    from core.models import Job
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_DATA_CHECK_INLINE_BYTES", "0")
    monkeypatch.setenv("TUNEQ_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("TUNEQ_LEASE_TTL_S", "1")
    reset_caches()
    with TestClient(create_app(), headers=admin_headers) as c:
        train = upload(c, [CHAT] * 4)
        # Created, then its process "dies": stop the background checks and take the lease away
        # from this process, as a crash would leave it.
        monkeypatch.setattr(validation.CHECKER, "start", lambda job_id: None)
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train})
        assert r.status_code == 200 and r.json()["status"] == "validating_files", r.text
        job_id = r.json()["id"]
        with session_scope() as db:
            db.get(Job, job_id).lease_owner = "api:gone:1"
        monkeypatch.undo()  # the environment too: the adopted check runs with the same settings
        monkeypatch.setenv("TUNEQ_DATA_CHECK_INLINE_BYTES", "0")
        monkeypatch.setenv("TUNEQ_HEARTBEAT_S", "0.2")
        monkeypatch.setenv("TUNEQ_LEASE_TTL_S", "1")
        job = settled(c, job_id)
        assert job["status"] == "queued", job


def test_a_check_that_keeps_faulting_fails_the_job_after_its_attempts(
    service_env: dict[str, str], admin_headers: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the check itself (not a line it refuses) is retried, each attempt an event the
    user sees; after validation.CHECK_ATTEMPTS the job fails and says so, rather than wait in
    validating_files for ever."""
    from api import admission, validation
    from api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_DATA_CHECK_INLINE_BYTES", "0")
    monkeypatch.setenv("TUNEQ_HEARTBEAT_S", "0.2")
    monkeypatch.setenv("TUNEQ_LEASE_TTL_S", "1")
    reset_caches()
    faults: list[str] = []

    def faulting(*args: Any, **kwargs: Any) -> Any:
        faults.append("check")
        raise TypeError("the checking child broke")

    monkeypatch.setattr(admission, "check_data", faulting)
    with TestClient(create_app(), headers=admin_headers) as c:
        train = upload(c, [CHAT] * 4)
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train})
        assert r.status_code == 200 and r.json()["status"] == "validating_files", r.text
        job = settled(c, r.json()["id"])
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "data_check_failed" and "nothing was trained" in job["error"]["message"]
        assert len(faults) == validation.CHECK_ATTEMPTS
        events = c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
        tries = [e["message"] for e in reversed(events) if e["message"].startswith(validation.CHECK_FAILED)]
        assert len(tries) == validation.CHECK_ATTEMPTS and "it will be retried" in tries[0], tries
        # The file is free again: a failed job holds none.
        assert c.delete(f"/v1/files/{train}").status_code == 200
