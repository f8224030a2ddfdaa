"""The official openai SDK, unmodified, against the tuneq app (ASGI, in process)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
import redis
from fastapi.testclient import TestClient

LINES = [json.dumps({"messages": [{"role": "user", "content": f"Reverse: {w}"}, {"role": "assistant", "content": w[::-1]}]})
         for w in ("apple", "river", "stone")]


@pytest.fixture
def sdk(service_env: dict[str, str], admin_key: str) -> Iterator[openai.OpenAI]:
    from api.main import create_app

    # TestClient is an httpx.Client that sends every request to the app, so the SDK's own
    # request building, response parsing and error mapping all run for real.
    with TestClient(create_app()) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=admin_key, http_client=http, max_retries=0)


def test_sdk_walkthrough(sdk: openai.OpenAI, service_env: dict[str, str]) -> None:
    f = sdk.files.create(file=("train.jsonl", ("\n".join(LINES) + "\n").encode()), purpose="fine-tune")
    assert f.id.startswith("file-") and f.status == "processed" and f.filename == "train.jsonl"
    assert sdk.files.retrieve(f.id).bytes == f.bytes
    assert sdk.files.content(f.id).text.splitlines() == LINES

    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id, seed=3, suffix="rev",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
    )
    assert job.status == "queued" and job.seed == 3 and job.hyperparameters.n_epochs == 2
    assert job.hyperparameters.batch_size == 2
    assert redis.Redis.from_url(service_env["TUNEQ_REDIS_URL"]).llen("tuneq") == 1

    lora = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id,
        extra_body={"method": {"type": "lora", "lora": {"r": 4, "alpha": 8}}, "hyperparameters": {"max_steps": 20}, "priority": 3},
    )
    assert lora.method.type == "supervised" and lora.priority == 3
    assert lora.method.supervised.method == "lora" and lora.method.supervised.lora["r"] == 4
    # The SDK builds its objects without validating them; a typed client validates. Every job
    # must be a valid FineTuningJob of the SDK's own types (method.type among OpenAI's).
    from openai.types.fine_tuning import FineTuningJob

    for raw in sdk.fine_tuning.jobs.with_raw_response.list().http_response.json()["data"]:
        FineTuningJob.model_validate(raw)

    assert sdk.fine_tuning.jobs.retrieve(job.id).id == job.id
    listed = [j.id for j in sdk.fine_tuning.jobs.list(limit=1)]  # iterating follows the cursor
    assert listed == [lora.id, job.id]

    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.data["to"] for e in events if e.kind == "status"] == ["cancelled", "queued", "validating_files"]
    assert all(e.object == "fine_tuning.job.event" for e in events)
    from openai.types.fine_tuning import FineTuningJobEvent

    for raw in sdk.fine_tuning.jobs.with_raw_response.list_events(job.id).http_response.json()["data"]:
        FineTuningJobEvent.model_validate(raw)
    assert sdk.fine_tuning.jobs.checkpoints.list(job.id).data == []
    assert [m.id for m in sdk.models.list()] == ["tiny-llama"]


def test_sdk_raises_typed_errors_with_param(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        sdk.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file="file-nope")
    assert exc.value.param == "training_file" and exc.value.code == "file_not_found"
    f = sdk.files.create(file=("t.jsonl", (LINES[0] + "\n").encode()), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, hyperparameters={"n_epochs": 0})
    assert exc.value.param == "hyperparameters.n_epochs"
    job = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    sdk.fine_tuning.jobs.cancel(job.id)
    assert sdk.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # a retried cancel is no error
    with pytest.raises(openai.ConflictError):
        sdk.fine_tuning.jobs.resume(job.id)


def test_sdk_metadata_is_stored_returned_and_filters_the_list(sdk: openai.OpenAI, service_env: dict[str, str]) -> None:
    f = sdk.files.create(file=("t.jsonl", (LINES[0] + "\n").encode()), purpose="fine-tune")
    a = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata={"team": "search", "run": "a b/1"})
    b = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata={"team": "ads"})
    plain = sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id)
    assert a.metadata == {"team": "search", "run": "a b/1"} and plain.metadata is None
    assert sdk.fine_tuning.jobs.retrieve(b.id).metadata == {"team": "ads"}
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "search"})] == [a.id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "search", "run": "a b/1"})] == [a.id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "search", "run": "x"})] == []
    assert [j.id for j in sdk.fine_tuning.jobs.list()] == [plain.id, b.id, a.id]
    # Beyond OpenAI's limits: 400 naming the field.
    for bad, param in (({f"k{i}": "v" for i in range(17)}, "metadata"), ({"k" * 65: "v"}, "metadata"),
                       ({"k": "v" * 513}, "metadata.k")):
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata=bad)
        assert exc.value.param == param, exc.value
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, metadata={"k": 1})  # type: ignore[dict-item]
    assert exc.value.param == "metadata.k"


def test_metadata_null_lists_jobs_without_metadata(service_env: dict[str, str], admin_headers: dict[str, str]) -> None:
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        f = c.post("/v1/files", files={"file": ("t.jsonl", LINES[0] + "\n")}, data={"purpose": "fine-tune"}).json()["id"]
        tagged = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": f, "metadata": {"x": "1"}})
        plain = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": f}).json()["id"]
        assert tagged.status_code == 200
        assert [j["id"] for j in c.get("/v1/fine_tuning/jobs?metadata=null").json()["data"]] == [plain]
        r = c.get("/v1/fine_tuning/jobs?metadata=yes")
        assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"


def test_sdk_integrations_are_stored_returned_and_checked(sdk: openai.OpenAI) -> None:
    f = sdk.files.create(file=("t.jsonl", (LINES[0] + "\n").encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=f.id,
        integrations=[{"type": "wandb", "wandb": {"project": "reverse", "entity": "team-a", "tags": ["v1"]}}],
    )
    for seen in (job, sdk.fine_tuning.jobs.retrieve(job.id)):
        (integration,) = seen.integrations
        assert integration.type == "wandb"
        assert (integration.wandb.project, integration.wandb.entity, integration.wandb.name,
                integration.wandb.tags) == ("reverse", "team-a", None, ["v1"])
    assert sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id).integrations == []

    bad = {
        "integrations[0].type": [{"type": "mlflow", "mlflow": {"project": "p"}}],
        "integrations[0].wandb": [{"type": "wandb"}],
        "integrations[0].wandb.project": [{"type": "wandb", "wandb": {"name": "run"}}],
        "integrations[0].wandb.tags": [{"type": "wandb", "wandb": {"project": "p", "tags": ["x" * 65]}}],
        "integrations[0].wandb.colour": [{"type": "wandb", "wandb": {"project": "p", "colour": "red"}}],
        "integrations[1].type": [{"type": "wandb", "wandb": {"project": "p"}}] * 2,
        "integrations": {"type": "wandb"},
    }
    for param, integrations in bad.items():
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, integrations=integrations)
        assert exc.value.param == param, (param, exc.value.message)
        assert exc.value.body["message"].startswith(param + ":"), exc.value.body
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id,
                                    integrations=[{"type": "wandb", "wandb": {"project": "a/b"}}])
    assert exc.value.param == "integrations[0].wandb.project" and "'/'" in exc.value.message


def test_the_sdk_lists_every_file_when_its_limit_is_over_the_page_size(
    service_env: dict[str, str], admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI's files list takes `limit` up to 10,000; tuneq serves pages of its own size and the
    SDK's iteration follows them to the last file."""
    from api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_PAGE_LIMIT_MAX", "2")
    reset_caches()
    with TestClient(create_app()) as http:
        sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=admin_key, http_client=http, max_retries=0)
        ids = [sdk.files.create(file=(f"{i}.jsonl", (LINES[0] + "\n").encode()), purpose="fine-tune").id for i in range(5)]
        assert [f.id for f in sdk.files.list(limit=10_000)] == ids[::-1]
        assert [f.id for f in sdk.files.list()] == ids[::-1]
