"""Fine-tuning jobs over HTTP on SQLite and PostgreSQL, with the real Redis queue behind them."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})
QUEUE = "tuneq"  # core.queue: task_default_queue


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        yield c


@pytest.fixture
def queue(service_env: dict[str, str]) -> redis.Redis:
    return redis.Redis.from_url(service_env["TUNEQ_REDIS_URL"])


@pytest.fixture
def file_id(client: TestClient) -> str:
    r = client.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 4)}, data={"purpose": "fine-tune"})
    assert r.json()["status"] == "processed"
    return r.json()["id"]


def queued_job_ids(queue: redis.Redis) -> list[str]:
    """Job ids of the task messages waiting in Redis, oldest first (kombu LPUSHes, workers BRPOP)."""
    ids = []
    for raw in reversed(queue.lrange(QUEUE, 0, -1)):
        message = json.loads(raw)
        assert message["headers"]["task"] == "tuneq.run_job"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        ids.append(args[0])
    return ids


def create(client: TestClient, **body):
    return client.post("/v1/fine_tuning/jobs", json=body)


def error_of(r) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def spec_of(job_id: str) -> dict:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        return db.get(Job, job_id).spec


def test_openai_body_creates_a_queued_job_and_enqueues_it(client: TestClient, file_id: str, queue: redis.Redis, tiny_model_dir) -> None:
    r = create(
        client, model="tiny-llama", training_file=file_id, validation_file=file_id, suffix="rev", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}}},
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "queued" and job["model"] == "tiny-llama"
    assert job["training_file"] == job["validation_file"] == file_id
    assert job["seed"] == 7 and job["user_provided_suffix"] == "rev" and job["integrations"] == []
    assert job["hyperparameters"]["n_epochs"] == 2
    assert job["hyperparameters"]["learning_rate"] == pytest.approx(1e-4)  # 0.5 × the LoRA base 2e-4
    # OpenAI's shape: the method under type "supervised", tuneq's own name and settings inside it.
    assert job["method"]["type"] == "supervised" and job["method"]["supervised"]["method"] == "lora"
    assert job["method"]["supervised"]["lora"]["r"] == 16
    assert queued_job_ids(queue) == [job["id"]]
    spec = spec_of(job["id"])
    assert spec["model"] == str(tiny_model_dir.resolve())  # the resolved directory, not the name
    assert spec["training_file"] == file_id and spec["hyperparameters"]["seed"] == 7
    assert spec["hyperparameters"]["batch_size"] == 4  # "auto" is the spec's default
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json() == job


def test_tuneq_extensions_reach_the_spec(client: TestClient, file_id: str, queue: redis.Redis) -> None:
    r = create(
        client, model="tiny-llama", training_file=file_id, priority=5, gpus=2, gradient_checkpointing=True,
        checkpoint_offload=True, precision="fp32", schedule={"checkpoint_every_steps": 10},
        method={"type": "qlora", "qlora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}},
        hyperparameters={"max_steps": 50, "learning_rate": 1e-3, "gradient_accumulation_steps": 2, "warmup_steps": 5,
                         "max_seq_len": 256, "weight_decay": 0.01, "max_grad_norm": 0.5},
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["priority"] == 5 and job["gpus"] == 2
    shown = job["method"]["supervised"]
    assert job["method"]["type"] == "supervised" and shown["method"] == "qlora"
    assert shown["lora"] == {**shown["lora"], "r": 8, "alpha": 16.0, "dropout": 0.1}
    spec = spec_of(job["id"])
    assert spec["method"] == "qlora" and spec["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert spec["hyperparameters"]["max_steps"] == 50 and spec["hyperparameters"]["learning_rate"] == 1e-3
    assert spec["schedule"]["checkpoint_every_steps"] == 10
    assert spec["gradient_checkpointing"] is True and spec["precision"] == "fp32"
    assert spec["checkpoint_offload"] is True
    full = create(client, model="tiny-llama", training_file=file_id, method="full",
                  hyperparameters={"learning_rate_multiplier": 2}).json()
    assert spec_of(full["id"])["method"] == "full"
    assert spec_of(full["id"])["hyperparameters"]["learning_rate"] == pytest.approx(4e-5)  # 2 × the full base 2e-5
    in_backward = create(client, model="tiny-llama", training_file=file_id, method="full", optimizer_in_backward=True,
                         hyperparameters={"max_grad_norm": 0}).json()
    assert spec_of(in_backward["id"])["optimizer_in_backward"] is True
    assert spec_of(full["id"])["optimizer_in_backward"] is False
    assert queued_job_ids(queue) == [job["id"], full["id"], in_backward["id"]]


# One test walks all cases: a fresh PostgreSQL database per case would cost more than the cases.
BAD_VALUES = [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 5000}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate": 2.0}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"max_steps": 5, "warmup_steps": 10}}, "hyperparameters.warmup_steps"),
    ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}}},
     "method.supervised.hyperparameters.batch_size"),
    ({"method": {"type": "lora", "lora": {"r": 0}}}, "method.lora.r"),
    ({"method": {"type": "lora", "lora": {"target_modules": ["q proj"]}}}, "method.lora.target_modules"),
    ({"method": {"type": "full", "full": {"r": 8}}}, "method.full"),
    ({"method": {"type": "reinforcement"}}, "method.type"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": "prompt_tuning"}, "method"),
    ({"seed": -1}, "seed"),
    ({"suffix": "no spaces"}, "suffix"),
    ({"precision": "fp8"}, "precision"),
    ({"speed": "turbo"}, "speed"),
    ({"speed": "lean", "checkpoint_layers": 1}, "checkpoint_layers"),
    ({"checkpoint_offload": True}, "checkpoint_offload"),  # speed auto may checkpoint nothing
    ({"speed": "fast", "checkpoint_offload": True}, "checkpoint_offload"),
    ({"speed": "balanced", "checkpoint_layers": 0, "checkpoint_offload": True}, "checkpoint_offload"),
    ({"speed": "lean", "checkpoint_offload": "sometimes"}, "checkpoint_offload"),
    ({"method": "full", "optimizer_in_backward": True}, "optimizer_in_backward"),  # clipping is on by default
    ({"method": "full", "optimizer_in_backward": True, "hyperparameters": {"max_grad_norm": 0},
      "gpus": 2}, "optimizer_in_backward"),
    ({"full_precision": "fp16"}, "full_precision"),
    ({"method": "lora", "strategy": "fsdp"}, "strategy"),
    ({"schedule": {"log_every_steps": 0}}, "schedule.log_every_steps"),
    ({"priority": 1000}, "priority"),
    ({"gpus": 0}, "gpus"),
    ({"nodes": 0}, "nodes"),
    ({"nodes": 65}, "nodes"),
    ({"method": "full", "optimizer_in_backward": True, "hyperparameters": {"max_grad_norm": 0},
      "nodes": 2}, "optimizer_in_backward"),  # two ranks, on two hosts
    ({"typo_field": 1}, "typo_field"),
    ({"model": "no-such-model"}, "model"),
    ({"training_file": "file-nope"}, "training_file"),
    ({"validation_file": "file-nope"}, "validation_file"),
]


def test_bad_values_name_their_field(client: TestClient, file_id: str, queue: redis.Redis) -> None:
    wrong = []
    for body, param in BAD_VALUES:
        r = create(client, **{"model": "tiny-llama", "training_file": file_id, **body})
        err = r.json().get("error") or {}
        if r.status_code != 400 or err.get("param") != param or err.get("type") != "invalid_request_error":
            wrong.append((body, param, r.status_code, err))
        elif not err["message"].startswith(param.split(".")[0]):
            wrong.append((body, "message should name the field", err["message"]))
    assert wrong == []
    assert queue.llen(QUEUE) == 0
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_unknown_model_lists_available_ones(client: TestClient, file_id: str) -> None:
    err = error_of(create(client, model="gpt-4o-mini", training_file=file_id))
    assert err["param"] == "model" and "tiny-llama" in err["message"]


def test_file_that_failed_validation_is_refused_with_its_lines(client: TestClient) -> None:
    bad = client.post("/v1/files", files={"file": ("b.jsonl", f"{GOOD_LINE}\nnope\n{GOOD_LINE}\n[]\n")},
                      data={"purpose": "fine-tune"}).json()
    err = error_of(create(client, model="tiny-llama", training_file=bad["id"]))
    assert err["param"] == "training_file"
    assert "line 2" in err["message"] and "line 4" in err["message"]


# Cursors compare timestamps in SQL, stored with other precision by each database.
@pytest.mark.dialects
def test_pages_are_newest_first_with_cursors(client: TestClient, file_id: str) -> None:
    ids = [create(client, model="tiny-llama", training_file=file_id).json()["id"] for _ in range(5)]
    newest_first = ids[::-1]
    seen, after = [], None
    while True:
        page = client.get("/v1/fine_tuning/jobs", params={"limit": 2, **({"after": after} if after else {})}).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert seen == newest_first
    assert error_of(client.get("/v1/fine_tuning/jobs", params={"limit": 10_001}))["param"] == "limit"
    assert error_of(client.get("/v1/fine_tuning/jobs", params={"limit": 0}))["param"] == "limit"
    assert error_of(client.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}))["param"] == "after"


def test_cancel_a_queued_job(client: TestClient, file_id: str) -> None:
    job = create(client, model="tiny-llama", training_file=file_id).json()
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    # Cancelling again (a retry whose first answer was lost) is the same answer, with no new event.
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert again.json()["finished_at"] == r.json()["finished_at"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"] == events


def test_cancel_of_a_finished_job_is_a_conflict(client: TestClient, file_id: str) -> None:
    from core import states
    from core.db import session_scope
    from core.models import Job

    job = create(client, model="tiny-llama", training_file=file_id).json()
    with session_scope() as db:
        row = db.get(Job, job["id"])
        row.status, row.finished_at = states.SUCCEEDED, row.created_at + 1
    r = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and r.json()["error"]["type"] == "conflict_error"
    assert "succeeded" in r.json()["error"]["message"]


# Event numbers and their order, as each database assigns them.
@pytest.mark.dialects
def test_events_newest_first_with_cursor(client: TestClient, file_id: str) -> None:
    job = create(client, model="tiny-llama", training_file=file_id).json()
    client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    # Status events only: job creation also logs a data_check summary between them.
    assert [e["data"]["to"] for e in events if e["kind"] == "status"] == ["cancelled", "queued", "validating_files"]
    assert [e["kind"] for e in events].count("data_check") == 1
    assert all(e["object"] == "fine_tuning.job.event" and e["level"] == "info" for e in events)
    assert events[0]["message"] == "Job cancelled."
    first = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1}).json()
    assert first["has_more"] is True and first["data"][0]["id"] == events[0]["id"]
    rest = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"after": events[0]["id"]}).json()
    assert [e["id"] for e in rest["data"]] == [e["id"] for e in events[1:]]


def test_unknown_job_is_404_everywhere(client: TestClient) -> None:
    for method, path in [("get", ""), ("post", "/cancel"), ("get", "/events"), ("get", "/checkpoints"),
                         ("get", "/artifacts"), ("get", "/artifacts/adapter.tar.gz/content")]:
        r = getattr(client, method)(f"/v1/fine_tuning/jobs/ftjob-nope{path}")
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == {"message": "No fine-tuning job with id 'ftjob-nope'", "type": "not_found_error",
                                     "param": None, "code": "not_found"}


def test_checkpoints_and_artifact_download(client: TestClient, file_id: str) -> None:
    import hashlib
    import io

    from core.db import session_scope
    from core.models import Artifact, Checkpoint
    from core.storage import get_storage

    job = create(client, model="tiny-llama", training_file=file_id, suffix="x").json()
    payload = b"\x1f\x8b pretend adapter archive" * 1000
    size, digest = get_storage().put_stream(f"jobs/{job['id']}/adapter.tar.gz", io.BytesIO(payload))
    with session_scope() as db:
        db.add_all([
            Checkpoint(job_id=job["id"], step=10, path="checkpoints/step-00000010", metrics={"train_loss": 2.0},
                       storage_key=f"jobs/{job['id']}/checkpoints/step-00000010", uploaded_at=1.0),
            Checkpoint(job_id=job["id"], step=20, path="checkpoints/step-00000020", metrics={"train_loss": 1.0},
                       storage_key=f"jobs/{job['id']}/checkpoints/step-00000020", uploaded_at=2.0),
            # Announced by the trainer, not yet in the store: neither resumable nor listed.
            Checkpoint(job_id=job["id"], step=30, path="checkpoints/step-00000030", metrics={"train_loss": 0.5}),
            Artifact(id="art-1", job_id=job["id"], name="adapter.tar.gz", kind="archive",
                     storage_key=f"jobs/{job['id']}/adapter.tar.gz", bytes=size, sha256=digest),
            Artifact(id="art-2", job_id=job["id"], name="final/lost.json", kind="file",
                     storage_key=f"jobs/{job['id']}/final/lost.json", bytes=1, sha256=""),
        ])
    cks = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step_number"] for c in cks] == [20, 10]
    assert cks[0]["object"] == "fine_tuning.job.checkpoint" and cks[0]["fine_tuning_job_id"] == job["id"]
    assert cks[0]["metrics"] == {"train_loss": 1.0} and cks[0]["fine_tuned_model_checkpoint"].endswith(":ckpt-step-20")

    arts = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]
    assert [(a["id"], a["name"], a["kind"], a["bytes"]) for a in arts] == [
        ("art-1", "adapter.tar.gz", "archive", len(payload)), ("art-2", "final/lost.json", "file", 1)]
    for ref in ("art-1", "adapter.tar.gz"):
        r = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/{ref}/content")
        assert r.status_code == 200 and r.content == payload
        assert hashlib.sha256(r.content).hexdigest() == arts[0]["sha256"]
        assert 'filename="adapter.tar.gz"' in r.headers["content-disposition"]
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/final/lost.json/content").status_code == 404
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/art-nope/content").status_code == 404
    other = create(client, model="tiny-llama", training_file=file_id).json()
    assert client.get(f"/v1/fine_tuning/jobs/{other['id']}/artifacts/art-1/content").status_code == 404


def test_from_checkpoint_refuses_a_method_that_cannot_take_the_saved_weights(client: TestClient, file_id: str) -> None:
    """The trainer would fail such a job once it ran (an adapter is no whole model, a rank-16
    adapter no rank-4 one); creation and the plan refuse it, naming from_checkpoint."""
    from core import states
    from core.db import session_scope
    from core.models import Job

    source = create(client, model="tiny-llama", training_file=file_id, method={"type": "lora", "lora": {"r": 16}}).json()
    with session_scope() as db:  # as if it had trained: only a succeeded job has final weights
        job = db.get(Job, source["id"])
        job.status, job.finished_at = states.SUCCEEDED, job.created_at + 1
    for method, said in [("full", "continues only from a whole model"),
                         ({"type": "lora", "lora": {"r": 4}}, "LoRA rank is 16, this job has lora.r=4"),
                         ("ia3", "this job trains IA3")]:
        body = {"model": "tiny-llama", "training_file": file_id, "from_checkpoint": source["id"], "method": method}
        for route in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/plan"):
            err = error_of(client.post(route, json=body))
            assert err["param"] == "from_checkpoint" and err["code"] == "incompatible_checkpoint", (route, err)
            assert said in err["message"] and "/" not in err["message"].split(":", 1)[1], err
    # The same method (or none: the earlier job's is kept) continues.
    for method in ({"type": "qlora", "qlora": {"r": 16}}, None):
        r = create(client, model="tiny-llama", training_file=file_id, from_checkpoint=source["id"],
                   **({"method": method} if method else {}))
        assert r.status_code == 200, r.text


def test_the_status_filter_lists_that_status_and_refuses_one_that_does_not_exist(client: TestClient, file_id: str) -> None:
    job = create(client, model="tiny-llama", training_file=file_id).json()
    assert [j["id"] for j in client.get("/v1/fine_tuning/jobs", params={"status": "queued"}).json()["data"]] == [job["id"]]
    assert client.get("/v1/fine_tuning/jobs", params={"status": "running"}).json()["data"] == []
    err = error_of(client.get("/v1/fine_tuning/jobs", params={"status": "bogus"}))
    assert err["param"] == "status" and "queued" in err["message"] and "'bogus'" in err["message"], err


# Pause and resume against a worker's lease as core.jobs and the runner hold it. Resume queues a
# paused job again and withdraws a pause the worker has not honoured yet; any other status is 409
# `invalid_state`. Above all it never moves a running job to the queue, which would drop its
# worker's lease and restart it from its last checkpoint.
WORKER = "worker-a"
J = "/v1/fine_tuning/jobs"


@pytest.fixture
def job_id(client: TestClient, file_id: str) -> str:
    return create(client, model="tiny-llama", training_file=file_id).json()["id"]


def start(job_id: str) -> int:
    """A worker takes the job's lease, as its delivery does; the attempt it runs."""
    from core.db import session_scope
    from core.jobs import acquire_lease

    with session_scope() as db:
        job = acquire_lease(db, job_id, WORKER, None)
        assert job is not None
        return job.lease_attempt


def worker_pauses(job_id: str, attempt: int) -> None:
    """The worker honours a pause: the trainer saved a checkpoint and stopped (worker.runner.finish)."""
    from core import states
    from core.db import session_scope
    from core.jobs import lock_leased_job

    with session_scope() as db:
        job = lock_leased_job(db, job_id, WORKER, attempt)
        assert job is not None
        job.pause_requested = False
        states.transition(db, job, states.PAUSED, "Job paused; resuming continues from the latest checkpoint.")


def row(job_id: str) -> tuple[str, bool, str | None, int]:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        job = db.get(Job, job_id)
        return job.status, job.pause_requested, job.lease_owner, job.lease_attempt


def messages(client: TestClient, job_id: str) -> list[str]:
    return [e["message"] for e in client.get(f"{J}/{job_id}/events", params={"limit": 100}).json()["data"]]


def assert_conflict(r, status: str) -> None:  # noqa: ANN001
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_state" and f"'{status}'" in err["message"], err


# The conditional UPDATEs take the job's row lock: both databases.
@pytest.mark.dialects
def test_resume_of_a_running_job_is_409_and_keeps_its_lease(client: TestClient, job_id: str) -> None:
    attempt = start(job_id)
    for _ in range(7):
        assert_conflict(client.post(f"{J}/{job_id}/resume"), "running")
    assert row(job_id) == ("running", False, WORKER, attempt)
    assert not any("resumed" in m for m in messages(client, job_id))


@pytest.mark.dialects
def test_resume_of_a_queued_or_finished_job_is_409(client: TestClient, job_id: str) -> None:
    assert_conflict(client.post(f"{J}/{job_id}/resume"), "queued")
    assert client.post(f"{J}/{job_id}/cancel").json()["status"] == "cancelled"
    assert_conflict(client.post(f"{J}/{job_id}/resume"), "cancelled")
    assert row(job_id)[0] == "cancelled"


@pytest.mark.dialects
def test_pause_and_resume_interleaved_keep_the_status_true(client: TestClient, job_id: str) -> None:
    # While the job starts: paused before a worker took it, no worker can take it until resumed.
    assert client.post(f"{J}/{job_id}/pause").json()["status"] == "paused"
    from core.db import session_scope
    from core.jobs import acquire_lease

    with session_scope() as db:
        assert acquire_lease(db, job_id, WORKER, None) is None
    assert client.post(f"{J}/{job_id}/resume").json()["status"] == "queued"
    attempt = start(job_id)

    # Running: each pause the worker has not honoured yet is withdrawn by a resume, and a resume
    # without a pause to withdraw changes nothing. The trainer keeps its lease all along.
    for _ in range(3):
        paused = client.post(f"{J}/{job_id}/pause")
        assert paused.json()["status"] == "running" and row(job_id) == ("running", True, WORKER, attempt)
        resumed = client.post(f"{J}/{job_id}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "running"
        assert row(job_id) == ("running", False, WORKER, attempt)
        assert_conflict(client.post(f"{J}/{job_id}/resume"), "running")
        assert row(job_id) == ("running", False, WORKER, attempt)

    # Honoured: paused only once the worker says the trainer stopped, queued again on resume.
    client.post(f"{J}/{job_id}/pause")
    worker_pauses(job_id, attempt)
    assert row(job_id)[:3] == ("paused", False, None)
    assert client.post(f"{J}/{job_id}/resume").json()["status"] == "queued"
    assert_conflict(client.post(f"{J}/{job_id}/resume"), "queued")
    assert start(job_id) == attempt + 1


@pytest.mark.dialects
def test_a_resume_racing_the_worker_or_a_cancel_reads_the_job_again(client: TestClient, job_id: str) -> None:
    """A resume that read the job before a worker paused it, or before a cancel, acts on what the
    job is when it writes: it queues the paused job, and leaves the cancelled one cancelled."""
    from core.control import request_resume
    from core.db import session_scope
    from core.jobs import request_cancel
    from core.models import Job
    from core.states import IllegalTransition

    attempt = start(job_id)
    client.post(f"{J}/{job_id}/pause")
    with session_scope() as db:
        seen = db.get(Job, job_id)  # running, pause asked
        assert (seen.status, seen.pause_requested) == ("running", True)
        db.commit()
        worker_pauses(job_id, attempt)
        assert request_resume(db, seen).status == "queued"
    assert row(job_id)[0] == "queued"

    client.post(f"{J}/{job_id}/pause")
    with session_scope() as db:
        seen = db.get(Job, job_id)
        assert seen.status == "paused"
        db.commit()
        with session_scope() as other:
            request_cancel(other, other.get(Job, job_id))
        with pytest.raises(IllegalTransition, match="'cancelled'"):
            request_resume(db, seen)
    assert row(job_id)[0] == "cancelled"


@pytest.mark.dialects
def test_a_resume_does_not_withdraw_a_preemption(client: TestClient, job_id: str) -> None:
    from core.control import preempt
    from core.db import session_scope
    from core.models import Job

    attempt = start(job_id)
    file_id = client.get(f"{J}/{job_id}").json()["training_file"]
    higher = client.post(J, json={"model": "tiny-llama", "training_file": file_id, "priority": 5}).json()["id"]
    with session_scope() as db:
        assert preempt(db, db.get(Job, job_id), db.get(Job, higher))
    assert_conflict(client.post(f"{J}/{job_id}/resume"), "running")
    assert row(job_id) == ("running", True, WORKER, attempt)


@pytest.mark.parametrize("content, headers, said", [
    (b'{"model": "tiny-llama", "training_file": ', {"content-type": "application/json"}, "not valid JSON"),
    (b"", {"content-type": "application/json"}, "body is missing"),
    (b"model=tiny-llama", {"content-type": "application/x-www-form-urlencoded"}, "must be a JSON object"),
    (b'["model"]', {"content-type": "application/json"}, "must be a JSON object"),
])
def test_a_body_that_is_no_json_object_is_told_so(client: TestClient, content: bytes, headers: dict, said: str) -> None:
    # Not "[23]: JSON decode error": the offset is no field of the body.
    r = client.post("/v1/fine_tuning/jobs", content=content, headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert said in err["message"] and err["param"] is None and err["code"] == "invalid_json", err


@pytest.mark.parametrize("method", ["lora", "auto"])
def test_a_learning_rate_that_is_not_a_finite_number_is_named_so(client: TestClient, file_id: str, method: str) -> None:
    body = json.dumps({"model": "tiny-llama", "training_file": file_id, "method": method,
                       "hyperparameters": {"learning_rate": float("nan")}})  # json writes NaN, as Python clients do
    r = client.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "hyperparameters.learning_rate" and "finite" in err["message"], err
