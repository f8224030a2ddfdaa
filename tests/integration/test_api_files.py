"""POST/GET /v1/files against a real database: storage keys, per-line validation, limits, pages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import reset_caches
from tests.integration.conftest import ChunkedBody, upload_scope

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


@pytest.fixture
def client(service_env: dict[str, str], admin_headers: dict[str, str]) -> Iterator[TestClient]:
    from api.main import create_app

    with TestClient(create_app(), headers=admin_headers) as c:
        yield c


def upload(c: TestClient, text: str, name: str = "train.jsonl", purpose: str = "fine-tune"):
    return c.post("/v1/files", files={"file": (name, text.encode(), "application/jsonl")}, data={"purpose": purpose})


def test_good_file_is_processed_and_stored_under_its_id(client: TestClient, service_env: dict[str, str]) -> None:
    text = (GOOD_LINE + "\n") * 3
    r = upload(client, text, name="../../etc/evil name.jsonl")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["object"] == "file" and f["id"].startswith("file-")
    assert f["status"] == "processed" and f["status_details"] is None
    assert f["bytes"] == len(text.encode()) and f["purpose"] == "fine-tune"
    assert f["validation"]["valid"] is True and f["validation"]["examples"] == 3
    assert f["filename"] == "evil name.jsonl"
    artifacts = Path(service_env["TUNEQ_HOME"]) / "artifacts"
    stored = [p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()]
    assert stored == [f"files/{f['id']}.jsonl"]
    assert client.get(f"/v1/files/{f['id']}").json() == f
    content = client.get(f"/v1/files/{f['id']}/content")
    assert content.status_code == 200 and content.text == text


def test_bad_file_reports_its_bad_lines(client: TestClient) -> None:
    text = "\n".join([GOOD_LINE, "{not json", GOOD_LINE, '{"messages": [{"role": "user", "content": "no answer"}]}']) + "\n"
    f = upload(client, text).json()
    assert f["status"] == "error"
    assert [e["line"] for e in f["validation"]["errors"]] == [2, 4]
    assert [e["code"] for e in f["validation"]["errors"]] == ["invalid_json", "no_assistant"]
    assert "line 2" in f["status_details"] and "line 4" in f["status_details"]
    assert f["validation"]["format"] == "chat"
    # A file none of whose lines is an example of any format has no format to report.
    odd = upload(client, '{"body": "x"}\n[1, 2]\n').json()
    assert odd["status"] == "error" and odd["validation"]["format"] is None
    assert [e["code"] for e in odd["validation"]["errors"]] == ["unknown_format", "not_object"]


def test_wrong_purpose_is_refused(client: TestClient) -> None:
    r = upload(client, GOOD_LINE + "\n", purpose="assistants")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "purpose"


def test_missing_file_field_names_it(client: TestClient) -> None:
    r = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "file"


def test_malformed_multipart_framing_is_a_client_error(client: TestClient) -> None:
    # A bare CR inside a part's header is a framing error of the client's body.
    body = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\rX\r\n\r\n{}\r\n--B--\r\n')
    r = client.post("/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "file" and "malformed" in r.json()["error"]["message"]


def test_upload_over_the_limit_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch, service_env: dict[str, str]) -> None:
    monkeypatch.setenv("TUNEQ_MAX_UPLOAD_BYTES", "100")
    reset_caches()
    r = upload(client, "x" * 101)  # over the file limit, inside the form's slack
    assert r.status_code == 413, r.text
    assert r.json()["error"]["param"] == "file"
    r = upload(client, "x" * 200_000)  # refused from Content-Length before the body is read
    assert r.status_code == 413
    assert "100 bytes" in r.json()["error"]["message"]
    assert upload(client, GOOD_LINE[:90]).status_code == 200
    artifacts = Path(service_env["TUNEQ_HOME"]) / "artifacts" / "files"
    assert len(list(artifacts.glob("*.jsonl"))) == 1


def test_streamed_upload_is_cut_off_at_the_limit(
    service_env: dict[str, str], admin_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Content-Length only counting the stream can stop it: the rest is never read."""
    import asyncio

    from api.main import create_app

    monkeypatch.setenv("TUNEQ_MAX_UPLOAD_BYTES", "1000")
    reset_caches()
    boundary = "tuneqboundary"
    head = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n"
    ).encode()
    chunks = [head] + [b"x" * 8192] * 100 + [f"\r\n--{boundary}--\r\n".encode()]
    body = ChunkedBody(chunks)
    scope = upload_scope(boundary, admin_key)
    asyncio.run(asyncio.wait_for(create_app()(scope, body.receive, body.send), 30))
    assert body.status() == 413 and body.json()["error"]["code"] == "file_too_large"
    assert body.consumed < 20, f"read {body.consumed} of {len(chunks)} chunks before refusing"


# Cursors compare timestamps in SQL, stored with other precision by each database.
@pytest.mark.dialects
def test_list_files_pages_newest_first(client: TestClient) -> None:
    ids = [upload(client, GOOD_LINE + "\n", name=f"{i}.jsonl").json()["id"] for i in range(3)]
    page = client.get("/v1/files", params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    rest = client.get("/v1/files", params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_unknown_file_is_404(client: TestClient) -> None:
    for path in ("/v1/files/file-nope", "/v1/files/file-nope/content"):
        r = client.get(path)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found_error"
