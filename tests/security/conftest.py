"""Fixtures of the shared-server tests: members of two teams, limits set per test, uploads."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import create_user_with_key, reset_caches

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


@pytest.fixture
def limits(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set TUNEQ_<NAME> settings for this test; the app reads them on the next request."""

    def set_limits(**values: object) -> None:
        for name, value in values.items():
            monkeypatch.setenv(f"TUNEQ_{name.upper()}", str(value))
        reset_caches()

    return set_limits


def client_for(name: str, role: str = "member", team: str | None = None) -> TestClient:
    from api.main import create_app

    _, key = create_user_with_key(name, role, team)
    return TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}, raise_server_exceptions=False)


@pytest.fixture
def member(service_env: dict[str, str]) -> Iterator[TestClient]:
    with client_for("alice", "member", "red") as c:
        yield c


@pytest.fixture
def admin(service_env: dict[str, str]) -> Iterator[TestClient]:
    with client_for("root", "admin") as c:
        yield c


def upload(c: TestClient, lines: int = 4, text: str | None = None) -> str:
    body = text if text is not None else (GOOD_LINE + "\n") * lines
    r = c.post("/v1/files", files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def create(c: TestClient, file_id: str, **extra):  # noqa: ANN201
    return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id, **extra})
