"""The data check at job creation (real app, database and Redis), and forgetting on the job."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneq import cli
from tuneq.client import Client

CHAT = {"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]}
LONG = {"prompt": "word " * 60, "completion": " end"}
TEXT = {"text": "The river runs to the sea."}


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str]) -> TestClient:
    from api.main import create_app

    return TestClient(create_app(), headers=admin_headers)


def upload(c: TestClient, rows: list[dict]) -> str:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = c.post("/v1/files", files={"file": ("f.jsonl", body, "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["status"] == "processed", r.text
    return r.json()["id"]


def test_job_creation_records_token_statistics_of_every_file(client: TestClient) -> None:
    train = upload(client, [CHAT] * 3 + [{"messages": [{"role": "user", "content": "word " * 60},
                                                        {"role": "assistant", "content": "ok"}]}])
    general = upload(client, [TEXT] * 2)
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": train, "hyperparameters": {"max_seq_len": 32},
        "mix": [{"file": general, "weight": 0.5}], "forgetting_file": general, "packing": True,
    })
    assert r.status_code == 200, r.text
    job = r.json()
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    check = next(e for e in events if e["kind"] == "data_check")
    stats = check["data"]
    assert set(stats) == {"training_file", "mix[0].file", "forgetting_file"}
    assert stats["training_file"] | {"tokens": 0, "trained_tokens": 0, "longest": 0} == {
        "file": train, "format": "chat", "examples": 4, "truncated": 1, "dropped": 1,
        "tokens": 0, "trained_tokens": 0, "longest": 0,
    }
    assert stats["training_file"]["longest"] > 32 and stats["mix[0].file"]["format"] == "text"
    assert "1 cut to max_seq_len 32" in check["message"] and "1 with nothing left to train" in check["message"]

    from core.db import session_scope
    from core.models import Job

    with session_scope() as db:
        spec = db.get(Job, job["id"]).spec
    assert spec["mix"] == [{"file": general, "weight": 0.5}] and spec["forgetting_file"] == general and spec["packing"]


def test_untrainable_data_is_refused_and_no_job_is_made(client: TestClient) -> None:
    long_only = upload(client, [LONG] * 3)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": long_only,
                                                  "hyperparameters": {"max_seq_len": 16}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "examples_truncated_away", r.text
    assert "raise hyperparameters.max_seq_len" in r.json()["error"]["message"]
    chat = upload(client, [CHAT] * 2)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": chat, "data_format": "text"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "invalid_file" and "line 1:" in err["message"], r.text
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_cli_status_shows_forgetting(client: TestClient, monkeypatch: pytest.MonkeyPatch, admin_key: str) -> None:
    from core.db import session_scope
    from core.models import Job

    train = upload(client, [CHAT] * 2)
    job_id = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train}).json()["id"]
    with session_scope() as db:
        db.get(Job, job_id).metrics = {"full_valid_loss": 0.5, "forgetting_loss_before": 0.8657, "forgetting_loss_after": 1.3541,
                                       "forgetting_perplexity_before": 2.38, "forgetting_perplexity_after": 3.87}
    monkeypatch.setenv("TUNEQ_API_KEY", admin_key)
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=client))
    out = CliRunner().invoke(cli.app, ["status", job_id])
    assert out.exit_code == 0, out.output
    assert "loss 0.8657 -> 1.3541, perplexity 2.38 -> 3.87" in out.stdout and "full_valid_loss" in out.stdout


def test_openai_tool_lines_are_accepted_and_bad_ones_reported_by_line(client: TestClient) -> None:
    from tests.unit.test_trainer_tool_data import TOOL_LINE

    train = upload(client, [TOOL_LINE] * 4)
    r = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": train})
    assert r.status_code == 200, r.text
    events = client.get(f"/v1/fine_tuning/jobs/{r.json()['id']}/events").json()["data"]
    assert next(e for e in events if e["kind"] == "data_check")["data"]["training_file"]["trained_tokens"] > 0

    bad = {**TOOL_LINE, "messages": [*TOOL_LINE["messages"][:3], {**TOOL_LINE["messages"][3], "tool_call_id": "nope"},
                                     TOOL_LINE["messages"][4]]}
    body = "".join(json.dumps(r) + "\n" for r in [TOOL_LINE, bad]).encode()
    f = client.post("/v1/files", files={"file": ("f.jsonl", body)}, data={"purpose": "fine-tune"}).json()
    assert f["status"] == "error"
    assert [(e["line"], e["code"]) for e in f["validation"]["errors"]] == [(2, "invalid_tool_message")]
