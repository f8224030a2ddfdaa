"""Fine-tuned models as OpenAI shows them: listed and retrieved under /v1/models by whoever may
read their job, and usable as a new job's `model` to continue training from their weights."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import create_user_with_key

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def app(service_env: dict[str, str]) -> Iterator[Any]:
    from api.main import create_app

    app = create_app()
    with TestClient(app):  # runs the lifespan once for the clients below
        yield app


def client_of(app: Any, name: str, team: str) -> TestClient:
    _, key = create_user_with_key(name, "member", team)
    return TestClient(app, headers={"Authorization": f"Bearer {key}"})


def trained_job(client: TestClient, suffix: str | None = None) -> dict[str, Any]:
    """A LoRA job that the worker would have trained: queued over HTTP, then succeeded with its
    fine-tuned model named as the worker names it, and a stored checkpoint at step 5."""
    from core import states
    from core.db import session_scope
    from core.inference import checkpoint_model_name, fine_tuned_model_name
    from core.models import Checkpoint, Job

    f = client.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 4)}, data={"purpose": "fine-tune"}).json()
    body = {"model": "tiny-llama", "training_file": f["id"], "method": {"type": "lora", "lora": {"r": 8}}}
    job = client.post(JOBS, json={**body, **({"suffix": suffix} if suffix else {})}).json()
    with session_scope() as db:
        row = db.get(Job, job["id"])
        ck = Checkpoint(job_id=row.id, step=5, path="checkpoints/step-00000005", metrics={}, storage_key="k",
                        uploaded_at=time.time())
        db.add(ck)
        db.flush()
        while_training = checkpoint_model_name(row, 5)
        row.status, row.finished_at = states.SUCCEEDED, row.created_at + 1
        row.fine_tuned_model = fine_tuned_model_name(row)
        # The name a client read from the checkpoint list while the job trained still names it.
        assert checkpoint_model_name(row, 5) == while_training
        return {"id": row.id, "model": row.fine_tuned_model, "checkpoint": ck.id, "checkpoint_model": while_training,
                "file": f["id"], "finished_at": int(row.finished_at)}


def test_fine_tuned_models_are_listed_and_retrieved_by_those_who_may_read_their_job(app: Any) -> None:
    owner, mate, outsider = client_of(app, "owner", "a"), client_of(app, "mate", "a"), client_of(app, "out", "b")
    job = trained_job(owner, suffix="bot")
    assert job["model"] == f"ft:tiny-llama:bot:{job['id']}"
    for c in (owner, mate):
        listed = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert set(listed) == {"tiny-llama", job["model"]}
        me = listed[job["model"]]
        assert me["object"] == "model" and me["created"] == job["finished_at"] and me["owned_by"] != "tuneq"
        assert c.get(f"/v1/models/{job['model']}").json() == me
        ck = c.get(f"/v1/models/{job['checkpoint_model']}")
        assert ck.status_code == 200 and ck.json()["id"] == job["checkpoint_model"], ck.text
    # Another team's member neither sees it listed nor can confirm it exists.
    assert [m["id"] for m in outsider.get("/v1/models").json()["data"]] == ["tiny-llama"]
    for name in (job["model"], job["checkpoint_model"], f"ft:tiny-llama:bot:ftjob-{'0' * 24}", "ft:nonsense"):
        r = outsider.get(f"/v1/models/{name}")
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (name, r.text)
    # A job that has not succeeded has no model to list.
    f = owner.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"}).json()
    queued = owner.post(JOBS, json={"model": "tiny-llama", "training_file": f["id"]}).json()
    assert owner.get(f"/v1/models/ft:tiny-llama:tuneq:{queued['id']}").status_code == 404
    assert len(owner.get("/v1/models").json()["data"]) == 2


def test_a_fine_tuned_model_as_the_job_model_continues_from_its_weights(app: Any) -> None:
    owner, outsider = client_of(app, "owner", "a"), client_of(app, "out", "b")
    job = trained_job(owner)
    for name, ref in ((job["model"], job["id"]), (job["checkpoint_model"], job["checkpoint"])):
        body = {"model": name, "training_file": job["file"]}
        plan = owner.post("/v1/fine_tuning/plan", json=body)
        assert plan.status_code == 200, plan.text
        r = owner.post(JOBS, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-llama"  # it trains the base, from the named weights
        spec = owner.get(f"{JOBS}/{r.json()['id']}").json()
        from core.db import session_scope
        from core.models import Job

        with session_scope() as db:
            stored = db.get(Job, spec["id"]).spec
        assert stored["init_from"] == ref and stored["method"] == "lora" and stored["lora"]["r"] == 8, stored
        # Naming the same weights twice is fine; naming other weights is refused.
        assert owner.post(JOBS, json={**body, "from_checkpoint": ref}).status_code == 200
    r = owner.post(JOBS, json={"model": job["model"], "training_file": job["file"], "from_checkpoint": job["checkpoint"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "from_checkpoint", r.text
    # Unknown or unreadable models are a 400 naming `model`, alike.
    f = outsider.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"}).json()
    for name in (job["model"], f"ft:tiny-llama:tuneq:ftjob-{'0' * 24}", "ft:"):
        for route in (JOBS, "/v1/fine_tuning/plan"):
            r = outsider.post(route, json={"model": name, "training_file": f["id"]})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "model" and err["code"] == "model_not_found", (name, r.text)
