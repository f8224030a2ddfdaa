"""Files on a shared server: a per-user count and byte quota, DELETE, and uploads that fail cleanly."""

from __future__ import annotations

from pathlib import Path

from tests.security.conftest import GOOD_LINE, client_for, create, upload


def stored(service_env: dict[str, str]) -> list[Path]:
    return sorted((Path(service_env["TUNEQ_HOME"]) / "artifacts" / "files").glob("*"))


def test_file_count_and_byte_quota_per_user(limits, member, service_env) -> None:  # noqa: ANN001
    limits(max_files_per_user=2)
    a, _ = upload(member), upload(member)
    r = member.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "file_count_limit" and err["param"] == "file" and "TUNEQ_MAX_FILES_PER_USER" in err["message"]
    assert "retry-after" not in r.headers
    assert len(stored(service_env)) == 2  # the refused upload left nothing
    # Deleting one makes room again; another user's quota is their own.
    assert member.delete(f"/v1/files/{a}").status_code == 200
    upload(member)
    with client_for("bob", "member", "red") as bob:
        upload(bob)

    limits(max_files_per_user=100, max_file_bytes_per_user=3 * (len(GOOD_LINE) + 1) * 4)
    r = member.post("/v1/files", files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 8)}, data={"purpose": "fine-tune"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "file_bytes_limit", r.text
    assert "TUNEQ_MAX_FILE_BYTES_PER_USER" in r.json()["error"]["message"]


def test_delete_removes_the_row_and_the_bytes(member, service_env) -> None:  # noqa: ANN001
    f = upload(member)
    assert len(stored(service_env)) == 1
    r = member.delete(f"/v1/files/{f}")
    assert r.status_code == 200 and r.json() == {"id": f, "object": "file", "deleted": True}
    assert stored(service_env) == []
    assert member.get(f"/v1/files/{f}").status_code == 404
    assert member.get(f"/v1/files/{f}/content").status_code == 404
    assert member.get("/v1/files").json()["data"] == []
    assert member.delete(f"/v1/files/{f}").status_code == 404
    assert create(member, f).json()["error"]["code"] == "file_not_found"


def test_delete_is_refused_while_an_unfinished_job_uses_the_file(member, service_env) -> None:  # noqa: ANN001
    f = upload(member)
    job = create(member, f).json()
    assert job["status"] == "queued"
    r = member.delete(f"/v1/files/{f}")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "file_in_use" and job["id"] in r.json()["error"]["message"]
    assert len(stored(service_env)) == 1
    member.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert member.delete(f"/v1/files/{f}").status_code == 200
    # The finished job still names its file; its row stays, only the bytes went.
    assert member.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["training_file"] == f


def test_only_the_owner_or_an_admin_deletes(member, admin) -> None:  # noqa: ANN001
    f = upload(member)
    with client_for("carol", "member", "red") as teammate:
        assert teammate.delete(f"/v1/files/{f}").status_code == 404
    assert admin.delete(f"/v1/files/{f}").status_code == 200


def test_a_line_nested_100000_deep_is_that_lines_invalid_json(member, service_env) -> None:  # noqa: ANN001
    deep = "[" * 100_000 + "]" * 100_000
    r = member.post("/v1/files", files={"file": ("t.jsonl", f"{GOOD_LINE}\n{deep}\n{GOOD_LINE}\n")},
                    data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text[:500]
    report = r.json()["validation"]
    assert r.json()["status"] == "error"
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "invalid_json")]
    assert len(stored(service_env)) == 1


def test_a_lone_surrogate_escape_is_that_lines_invalid_utf8_and_no_job_takes_the_file(member) -> None:  # noqa: ANN001
    # JSON may escape half of a UTF-16 pair alone; such a string is no text, and the tokenizer
    # would raise on it at the job's data check. A whole pair (an emoji) is text.
    lone = '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "yo"}]}'
    pair = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "yo"}]}'
    text = '{"text": "abc \\udc00 def"}'
    r = member.post("/v1/files", files={"file": ("t.jsonl", f"{pair}\n{lone}\n{GOOD_LINE}\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text[:500]
    assert r.json()["status"] == "error"
    assert [(e["line"], e["code"]) for e in r.json()["validation"]["errors"]] == [(2, "invalid_utf8")]
    assert "surrogate" in r.json()["validation"]["errors"][0]["message"]
    r = member.post("/v1/files", files={"file": ("t.jsonl", text + "\n")}, data={"purpose": "fine-tune"})
    assert r.json()["status"] == "error" and r.json()["validation"]["error_counts"] == {"invalid_utf8": 1}
    r = member.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": r.json()["id"]})
    assert r.status_code == 400, r.text[:500]
    assert r.json()["error"]["param"] == "training_file"


def test_an_upload_that_fails_leaves_nothing_behind(member, service_env, monkeypatch) -> None:  # noqa: ANN001
    from api.routes import files

    def broken(path: str) -> dict:
        raise RuntimeError("validator crashed")

    monkeypatch.setattr(files, "_validate", broken)
    r = member.post("/v1/files", files={"file": ("t.jsonl", GOOD_LINE + "\n")}, data={"purpose": "fine-tune"})
    assert r.status_code == 500
    assert stored(service_env) == []
    assert member.get("/v1/files").json()["data"] == []
