"""Per-user limits through the API: unfinished jobs, GPUs, creation rate, examples and tokens per file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import create_user_with_key, reset_caches

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


@pytest.fixture
def limits(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def set_limits(**values: int) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"TUNEQ_{name.upper()}", str(value))
        reset_caches()

    return set_limits


@pytest.fixture
def member(service_env: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    _, key = create_user_with_key("alice", "member", "red")
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def upload(c: TestClient, lines: int = 4) -> str:
    r = c.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * lines)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(c: TestClient, file_id: str, **extra):  # noqa: ANN201
    return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **extra})


# The quota check locks the user's row (FOR UPDATE) and counts with FILTER: both databases.
@pytest.mark.dialects
def test_unfinished_jobs_per_user(limits, member: TestClient, admin_headers: dict[str, str]) -> None:  # noqa: ANN001
    limits(max_active_jobs_per_user=2)
    f = upload(member)
    first, second = create(member, f).json(), create(member, f).json()
    r = create(member, f)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "active_job_limit" and "2 unfinished jobs" in err["message"] and "TUNEQ_MAX_ACTIVE_JOBS_PER_USER" in err["message"]
    assert "retry-after" not in r.headers  # waiting alone does not help; a job must end
    # Another user's quota is their own.
    assert create(TestClient(member.app, headers=admin_headers), upload(TestClient(member.app, headers=admin_headers))).status_code == 200
    assert member.post(f"/v1/fine_tuning/jobs/{first['id']}/cancel").json()["status"] == "cancelled"
    assert create(member, f).status_code == 200
    assert second["status"] == "queued"


# As above: the GPU sum is a FILTERed aggregate under the row lock.
@pytest.mark.dialects
def test_gpus_per_user(limits, member: TestClient) -> None:  # noqa: ANN001
    limits(max_gpus_per_user=3)
    f = upload(member)
    too_many = create(member, f, gpus=4)
    assert too_many.status_code == 403 and too_many.json()["error"]["param"] == "gpus"
    assert "3 GPUs" in too_many.json()["error"]["message"]
    across = create(member, f, gpus=2, nodes=2)  # the GPUs of every host count
    assert across.status_code == 403 and "2 GPUs on each of 2 nodes" in across.json()["error"]["message"], across.text
    job = create(member, f, gpus=2).json()
    over = create(member, f, gpus=2)
    assert over.status_code == 403 and over.json()["error"]["code"] == "gpu_limit"
    assert "ask for 2 GPUs" in over.json()["error"]["message"]
    assert create(member, f, gpus=1).status_code == 200
    member.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert create(member, f, gpus=2).status_code == 200


def test_a_job_across_hosts_counts_the_gpus_of_every_host(limits, member: TestClient) -> None:  # noqa: ANN001
    from core.db import session_scope
    from core.models import Job

    limits(max_gpus_per_user=3)
    f = upload(member)
    job = create(member, f, gpus=1).json()
    with session_scope() as db:  # as a job across two hosts is stored (creating one is refused for now)
        row = db.get(Job, job["id"])
        row.spec = {**row.spec, "nodes": 2}
    over = create(member, f, gpus=2)
    assert over.status_code == 403 and "ask for 2 GPUs" in over.json()["error"]["message"], over.text
    assert create(member, f, gpus=1).status_code == 200


# As above; the resume takes the same row lock.
@pytest.mark.dialects
def test_resume_checks_the_gpu_quota_again(limits, member: TestClient, admin_headers: dict[str, str]) -> None:  # noqa: ANN001
    """Paused jobs hold no GPUs, so others may be created meanwhile; resuming asks for the GPUs
    again and is refused as a creation would be, whoever resumes the job."""
    limits(max_gpus_per_user=8, max_active_jobs_per_user=10)
    f = upload(member)
    made = [create(member, f) for _ in range(8)]
    assert all(r.status_code == 200 for r in made), [r.text for r in made if r.status_code != 200]
    paused = [r.json()["id"] for r in made]
    for job_id in paused:
        assert member.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
    assert [create(member, f).status_code for _ in range(2)] == [200, 200]
    assert create(member, f).json()["error"]["code"] == "active_job_limit"  # paused jobs are unfinished

    answers = [member.post(f"/v1/fine_tuning/jobs/{job_id}/resume") for job_id in paused]
    assert [r.status_code for r in answers] == [200] * 6 + [403] * 2, [r.text for r in answers]
    refused = answers[-1]
    err = refused.json()["error"]
    assert err["code"] == "gpu_limit" and err["param"] == "gpus", err
    assert "ask for 8 GPUs; 1 more would exceed the 8" in err["message"] and "TUNEQ_MAX_GPUS_PER_USER" in err["message"]
    assert "retry-after" not in refused.headers
    assert [member.get(f"/v1/fine_tuning/jobs/{j}").json()["status"] for j in paused[-2:]] == ["paused", "paused"]
    # The owner's quota, whoever asks: an admin's resume of the member's job counts the member's GPUs.
    admin = TestClient(member.app, headers=admin_headers)
    assert admin.post(f"/v1/fine_tuning/jobs/{paused[-1]}/resume").json()["error"]["code"] == "gpu_limit"

    assert member.post(f"/v1/fine_tuning/jobs/{paused[0]}/cancel").json()["status"] == "cancelled"
    assert member.post(f"/v1/fine_tuning/jobs/{paused[-1]}/resume").json()["status"] == "queued"
    assert member.post(f"/v1/fine_tuning/jobs/{paused[-2]}/resume").status_code == 403


def test_job_creation_rate_answers_429_with_retry_after(limits, member: TestClient) -> None:  # noqa: ANN001
    # A fixed window: an hour, so that four creations on a busy machine never straddle two windows.
    limits(job_create_rate=3, job_create_window_s=3600)
    f = upload(member)
    assert [create(member, f).status_code for _ in range(3)] == [200, 200, 200]
    r = create(member, f)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= 3601
    assert f"try again in {r.headers['retry-after']} s" in r.json()["error"]["message"]


def test_examples_per_file(limits, member: TestClient, service_env: dict[str, str]) -> None:  # noqa: ANN001
    from pathlib import Path

    limits(max_examples_per_file=3)
    upload(member, 3)
    r = member.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 4)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_many_examples" and "4 examples" in r.json()["error"]["message"]
    stored = list((Path(service_env["TUNEQ_HOME"]) / "artifacts" / "files").glob("*"))
    assert len(stored) == 1  # the refused file was not kept
    assert len(member.get("/v1/files").json()["data"]) == 1


def test_tokens_per_file_counted_with_the_models_tokenizer(limits, member: TestClient) -> None:  # noqa: ANN001
    f = upload(member, 4)
    limits(max_tokens_per_file=20)
    r = create(member, f)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["param"] == "training_file" and err["code"] == "too_many_tokens" and "tokens" in err["message"]
    limits(max_tokens_per_file=100_000)
    assert create(member, f).status_code == 200


def test_a_limit_over_the_page_size_gets_full_pages_to_follow(limits, member: TestClient) -> None:  # noqa: ANN001
    """OpenAI allows `limit` up to 10,000 (its files list defaults to that). A limit over the
    server's page size is served as pages of that size with has_more, which a client follows; a
    limit outside OpenAI's range is the client's error."""
    limits(page_limit_max=2)
    files = [upload(member, 1) for _ in range(3)]
    jobs = [create(member, files[0]).json()["id"] for _ in range(3)]
    for url, ids in (("/v1/files", files), ("/v1/fine_tuning/jobs", jobs)):
        page = member.get(url, params={"limit": 10_000}).json()
        assert len(page["data"]) == 2 and page["has_more"] is True, url
        rest = member.get(url, params={"limit": 10_000, "after": page["last_id"]}).json()
        assert [x["id"] for x in page["data"] + rest["data"]] == ids[::-1] and rest["has_more"] is False, url
        for bad in (0, 10_001):
            r = member.get(url, params={"limit": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "limit", (url, bad)
    # The files list's default is OpenAI's (all files), so it too is a full page to follow.
    assert len(member.get("/v1/files").json()["data"]) == 2
    assert len(member.get(f"/v1/fine_tuning/jobs/{jobs[0]}/events", params={"limit": 500}).json()["data"]) <= 2


def test_a_job_tokenizes_its_file_once(limits, member: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The token limit and the job's data check read one cached report, also when the job names a
    data format (they used to ask with different arguments, so a big file was tokenized twice)."""
    import trainer.data.validate
    from api import data_check

    data_check.token_report.cache_clear()
    calls = []
    real = trainer.data.validate.validate_file

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[0])
        return real(*args, **kwargs)

    f = upload(member, 4)  # the upload's own check (no model yet) is not counted
    limits(max_tokens_per_file=100_000)
    monkeypatch.setattr(trainer.data.validate, "validate_file", counted)
    assert create(member, f, data_format="chat").status_code == 200
    assert len(calls) == 1, calls
