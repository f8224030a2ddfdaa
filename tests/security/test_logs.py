"""Logs on a shared server: one line per server error with a request id, and files that rotate."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.security.conftest import GOOD_LINE


def test_a_server_error_is_one_line_with_the_request_id(service_env, admin_headers, monkeypatch,  # noqa: ANN001
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from api.main import create_app
    from api.routes import files

    def broken(path: str) -> dict:
        raise RuntimeError("validator crashed\nsecond line")

    monkeypatch.setattr(files, "_validate", broken)
    caplog.set_level(logging.INFO)
    # raise_server_exceptions=True: an error that escaped to the server (which prints it in full)
    # would be raised here instead of answered.
    with TestClient(create_app(), headers=admin_headers) as c:
        r = c.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"},
                   headers={"X-Request-Id": "probe-1"})
        other = c.get("/v1/models")
    assert r.status_code == 500 and r.headers["x-request-id"] == "probe-1"
    assert "probe-1" in r.json()["error"]["message"]
    assert other.headers["x-request-id"].startswith("req_")
    errors = [rec for rec in caplog.records if rec.levelno >= logging.INFO and rec.name.startswith(("tuneq", "uvicorn"))
              and "probe-1" in rec.getMessage()]
    assert len(errors) == 1, [rec.getMessage() for rec in errors]
    assert errors[0].exc_info is None and "\n" not in errors[0].getMessage()
    assert "RuntimeError: validator crashed second line" in errors[0].getMessage()


def test_a_forged_request_id_is_replaced(service_env, admin_headers) -> None:  # noqa: ANN001
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        r = c.get("/v1/models", headers={"X-Request-Id": "x" * 65})
    assert r.headers["x-request-id"].startswith("req_")


def test_child_logs_rotate(tmp_path: Path) -> None:
    from tuneq.stack import copy_rotated

    stream = io.BytesIO(b"".join(b"line %05d of a chatty child\n" % i for i in range(2000)))
    copy_rotated(stream, tmp_path / "api.log", max_bytes=10_000, backups=3)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["api.log", "api.log.1", "api.log.2", "api.log.3"]
    assert all(p.stat().st_size <= 10_000 for p in tmp_path.iterdir())
    assert (tmp_path / "api.log").read_text().splitlines()[-1] == "line 01999 of a chatty child"
