"""GET /v1/models, model names that try to leave the model roots, and /healthz."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import reset_caches

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        yield c


def test_lists_the_models_under_the_roots(client: TestClient) -> None:
    page = client.get("/v1/models").json()
    assert page["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in page["data"]] == [("tiny-llama", "model", "tuneq")]
    assert client.get("/v1/models/tiny-llama").json()["id"] == "tiny-llama"
    assert client.get("/v1/models/nope").status_code == 404


def test_model_names_cannot_escape_the_roots(
    client: TestClient, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real model outside the root, reachable by '..', by absolute path and by a planted symlink.
    outside = tmp_path / "outside" / "secret"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape").symlink_to(outside)
    # Leaves its own root, so it is not offered from there; the second root still has tiny-llama.
    (root / "tiny-llama").symlink_to(tiny_model_dir)
    monkeypatch.setenv("TUNEQ_MODEL_ROOTS", json.dumps([str(root), str(tiny_model_dir.parent)]))
    reset_caches()
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
    f = client.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"}).json()
    relative = "../" * 12 + str(outside).lstrip("/")
    for name in ("escape", "tiny-llama/../escape", str(outside), relative, "../outside/secret"):
        r = client.post("/v1/fine_tuning/jobs", json={"model": name, "training_file": f["id"]})
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "model" and "tiny-llama" in err["message"]
        assert str(outside) not in err["message"].replace(name, "")  # never reveals where a link leads
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    ok = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": f["id"]})
    assert ok.status_code == 200, ok.text


def test_healthz_checks_database_and_redis(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok", "redis": "ok"}
    monkeypatch.setenv("TUNEQ_REDIS_URL", "redis://127.0.0.1:1/0")
    reset_caches()
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "error" and r.json()["database"] == "ok" and r.json()["redis"].startswith("error")


def test_unknown_route_uses_the_error_envelope(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_openapi_documents_every_route(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/events", "/v1/models", "/healthz",
            "/v1/fine_tuning/jobs/{job_id}/artifacts/{artifact}/content"} <= set(paths)
