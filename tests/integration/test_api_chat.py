"""Chat completions through the real app, Redis and an inference server (worker.serve.Server on
the tiny model, in a thread of the test): the queue, the reply stream, the CLI, and the 503s."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.conftest import create_user_with_key
from tuneq import cli
from tuneq.client import Client

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

ASK = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Reverse: apple"}], "temperature": 0, "max_tokens": 6}


@pytest.fixture
def app(service_env: dict[str, str]) -> Any:
    from api.main import create_app

    return create_app()


@pytest.fixture
def key(service_env: dict[str, str]) -> str:
    return create_user_with_key("chatter")[1]


@pytest.fixture
def client(app: Any, key: str) -> Iterator[TestClient]:
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture
def server(service_env: dict[str, str]) -> Iterator[Any]:
    import redis

    from core.settings import get_settings
    from worker.model_cache import ModelCache
    from worker.serve import Server

    settings = get_settings()
    s = Server(settings, redis.Redis.from_url(settings.redis_url), ModelCache(), "test:1")
    s.register()  # before the first request: the API answers 503 while no server is registered
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    yield s
    s.stopping = True
    thread.join(10)


def test_without_an_inference_server_the_route_answers_503(client):
    r = client.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_inference_server", r.text
    assert r.headers["Retry-After"]


def test_a_request_no_server_takes_times_out_with_503(client, monkeypatch):
    import redis

    from core import inference
    from core.settings import get_settings

    monkeypatch.setenv("TUNEQ_CHAT_QUEUE_TIMEOUT_S", "1")
    get_settings.cache_clear()
    inference.register_server(redis.Redis.from_url(get_settings().redis_url), "silent:1", 30)  # registered, never reads
    r = client.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 503 and r.json()["error"]["code"] == "inference_timeout", r.text


def test_whole_and_streamed_answers_agree_and_the_cli_prints_them(client, server, app, key, monkeypatch, tmp_path: Path):
    whole = client.post("/v1/chat/completions", json=ASK)
    assert whole.status_code == 200, whole.text
    answer = whole.json()["choices"][0]["message"]["content"]
    assert whole.json()["usage"]["completion_tokens"] == 6 and whole.json()["choices"][0]["finish_reason"] == "length"
    pieces = list(Client("http://testserver", http=client).chat(ASK))
    assert len(pieces) > 1 and "".join(pieces) == answer  # greedy decoding: the same text, in pieces
    assert server.cache.loads == [server.cache.stats()["bases"][0]]  # one base load for both

    monkeypatch.setenv("TUNEQ_API_KEY", key)
    monkeypatch.setenv("TUNEQ_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setattr(cli, "make_client", lambda: Client("http://testserver", http=TestClient(app)))
    out = CliRunner().invoke(cli.app, ["chat", "tiny-llama", "-m", "Reverse: apple", "--temperature", "0", "--max-tokens", "6"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == answer.strip()
    missing = CliRunner().invoke(cli.app, ["chat", "no-such-model", "-m", "hi"])
    assert missing.exit_code == 1 and "no-such-model" in missing.output and "Traceback" not in missing.output
