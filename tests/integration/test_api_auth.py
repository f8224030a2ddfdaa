"""Who may call what: every route of the app × (owner, teammate, stranger, admin, no key, bad keys).

The route list comes from the app itself, so a route added without a rule here fails this test
instead of shipping unchecked.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from tests.conftest import create_user_with_key, reset_caches

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})
J = "/v1/fine_tuning/jobs/{job_id}"

# What each kind of route answers: "ok" (anything but 401/403/404 and 5xx) or an exact status.
OK = "ok"
KINDS: dict[str, dict[str, Any]] = {
    "public": {"owner": OK, "teammate": OK, "stranger": OK, "admin": OK, "none": OK},
    "any_user": {"owner": OK, "teammate": OK, "stranger": OK, "admin": OK, "none": 401},
    "job_read": {"owner": OK, "teammate": OK, "stranger": 404, "admin": OK, "none": 401},
    "job_change": {"owner": OK, "teammate": 403, "stranger": 404, "admin": OK, "none": 401},
    "file_read": {"owner": OK, "teammate": 404, "stranger": 404, "admin": OK, "none": 401},
    "file_change": {"owner": OK, "teammate": 404, "stranger": 404, "admin": OK, "none": 401},
    "admin": {"owner": 403, "teammate": 403, "stranger": 403, "admin": OK, "none": 401},
}

RULES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "public",
    # The dashboard's page holds no data; its scripts call the API with the user's key.
    ("GET", "/ui"): "public",
    ("GET", "/ui/"): "public",
    # Service-wide figures (every team's jobs, worker host names): admins only.
    ("GET", "/metrics"): "admin",
    ("POST", "/v1/files"): "any_user",
    ("GET", "/v1/files"): "any_user",
    ("GET", "/v1/files/{file_id}"): "file_read",
    ("GET", "/v1/files/{file_id}/content"): "file_read",
    ("DELETE", "/v1/files/{file_id}"): "file_change",
    ("POST", "/v1/fine_tuning/jobs"): "any_user",
    ("GET", "/v1/fine_tuning/jobs"): "any_user",
    ("POST", "/v1/fine_tuning/plan"): "any_user",
    ("GET", J): "job_read",
    ("POST", J + "/cancel"): "job_change",
    ("POST", J + "/pause"): "job_change",
    ("POST", J + "/resume"): "job_change",
    ("GET", J + "/events"): "job_read",
    ("GET", J + "/events/stream"): "job_read",
    ("GET", J + "/stream"): "job_read",
    ("GET", J + "/checkpoints"): "job_read",
    ("GET", J + "/artifacts"): "job_read",
    ("GET", J + "/artifacts/{artifact}/content"): "job_read",
    ("GET", "/v1/models"): "any_user",
    ("GET", "/v1/models/{model}"): "any_user",
    # Any user may ask; whose models answer is checked per model (tests/e2e/test_chat.py: another
    # user's fine-tuned model is a 404 naming `model`, like an unknown one).
    ("POST", "/v1/chat/completions"): "any_user",
    # The cluster's capacity (hosts, GPU kinds, free GPUs, disk): what members plan jobs against.
    # It names no job, team or user.
    ("GET", "/v1/hosts"): "any_user",
    ("GET", "/v1/admin/users"): "admin",
    ("POST", "/v1/admin/users"): "admin",
    ("GET", "/v1/admin/users/{user_id}"): "admin",
    ("PATCH", "/v1/admin/users/{user_id}"): "admin",
    ("PATCH", "/v1/admin/teams/{team}"): "admin",
    ("GET", "/v1/admin/users/{user_id}/keys"): "admin",
    ("POST", "/v1/admin/users/{user_id}/keys"): "admin",
    ("POST", "/v1/admin/keys/{key_id}/revoke"): "admin",
}
# Documentation of the API, not data: readable without a key.
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def app_routes(app: Any) -> list[tuple[str, str]]:
    routes = []
    for ctx in iter_route_contexts(app.routes):
        if ctx.path_format in DOCS:
            continue
        for method in sorted((ctx.methods or set()) - {"HEAD"}):
            routes.append((method, ctx.path_format))
    return routes


@dataclass
class World:
    client: TestClient
    keys: dict[str, str]
    ids: dict[str, str]
    fresh_job: Callable[[], str]
    counter: list[int] = field(default_factory=lambda: [0])

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"} if who in self.keys else {}


@pytest.fixture
def world(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    from api.main import create_app
    from core.db import session_scope
    from core.models import Artifact, Checkpoint
    from core.storage import get_storage

    # The matrix creates many jobs for one owner; limits have their own tests.
    monkeypatch.setenv("TUNEQ_MAX_ACTIVE_JOBS_PER_USER", "1000")
    monkeypatch.setenv("TUNEQ_JOB_CREATE_RATE", "1000")
    monkeypatch.setenv("TUNEQ_MAX_GPUS_PER_USER", "1000")
    reset_caches()
    keys, ids = {}, {}
    for who, role, team in (("owner", "member", "red"), ("teammate", "member", "red"),
                            ("stranger", "member", "blue"), ("admin", "admin", None)):
        ids[who], keys[who] = create_user_with_key(who, role, team)
    with TestClient(create_app()) as client:
        auth = {"Authorization": f"Bearer {keys['owner']}"}
        f = client.post("/v1/files", headers=auth, files={"file": ("t.jsonl", (GOOD_LINE + "\n") * 4)},
                        data={"purpose": "fine-tune"})
        assert f.status_code == 200, f.text
        ids["file_id"] = f.json()["id"]

        def fresh_job() -> str:
            r = client.post("/v1/fine_tuning/jobs", headers=auth, json={"model": "tiny-llama", "training_file": ids["file_id"]})
            assert r.status_code == 200, r.text
            return r.json()["id"]

        job_id = fresh_job()
        size, digest = get_storage().put_stream(f"jobs/{job_id}/adapter.tar.gz", io.BytesIO(b"adapter"))
        with session_scope() as db:
            db.add(Checkpoint(job_id=job_id, step=1, path="checkpoints/step-00000001", metrics={},
                              storage_key=f"jobs/{job_id}/checkpoints/step-00000001", uploaded_at=1.0))
            db.add(Artifact(id=f"art-{job_id}", job_id=job_id, name="adapter.tar.gz", kind="archive",
                            storage_key=f"jobs/{job_id}/adapter.tar.gz", bytes=size, sha256=digest))
        ids["job_id"] = job_id
        ids["artifact"] = f"art-{job_id}"
        yield World(client=client, keys=keys, ids=ids, fresh_job=fresh_job)


def build_request(world: World, method: str, path: str, who: str, kind: str) -> dict[str, Any]:
    """The URL and body of one call; routes that change something get fresh objects per call."""
    world.counter[0] += 1
    n = world.counter[0]
    values = {"file_id": world.ids["file_id"], "artifact": world.ids["artifact"], "model": "tiny-llama",
              "user_id": world.ids["stranger"], "team": "blue"}
    if kind == "file_change":  # deleting the shared file would change what later calls see
        r = world.client.post("/v1/files", headers=world.headers("owner"), files={"file": ("t.jsonl", GOOD_LINE + "\n")},
                              data={"purpose": "fine-tune"})
        values["file_id"] = r.json()["id"]
    values["job_id"] = world.fresh_job() if kind == "job_change" else world.ids["job_id"]
    if "{key_id}" in path:
        from core.db import session_scope
        from core.identity import create_key, find_user

        with session_scope() as db:
            values["key_id"] = create_key(db, find_user(db, "stranger"), f"victim-{n}")[0].id
    url = path
    for name, value in values.items():
        url = url.replace("{" + name + "}", value)
    if "{" in url:
        pytest.fail(f"{method} {path}: the matrix has no value for its path parameter; add one in build_request")
    req: dict[str, Any] = {"method": method, "url": url, "headers": world.headers(who)}
    if (method, path) == ("POST", "/v1/files"):
        req["files"] = {"file": ("t.jsonl", GOOD_LINE + "\n")}
        req["data"] = {"purpose": "fine-tune"}
    elif (method, path) in (("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/plan")):
        # The caller's own file: someone else's would be refused for another reason.
        own = world.ids["file_id"] if who in ("owner", "admin", "none") else None
        if own is None:
            r = world.client.post("/v1/files", headers=world.headers(who), files={"file": ("t.jsonl", GOOD_LINE + "\n")},
                                  data={"purpose": "fine-tune"})
            own = r.json()["id"]
        req["json"] = {"model": "tiny-llama", "training_file": own}
    elif (method, path) == ("POST", "/v1/admin/users"):
        req["json"] = {"name": f"new-user-{n}", "team": "green"}
    elif method == "PATCH":
        req["json"] = {"max_priority": 0}
    elif method == "POST" and kind != "job_change":
        req["json"] = {}
    return req


def test_every_route_has_a_rule(world: World) -> None:
    missing = [r for r in app_routes(world.client.app) if r not in RULES]
    assert missing == [], f"routes without an authorization rule in this test: {missing}"


def test_matrix(world: World) -> None:
    wrong = []
    for method, path in app_routes(world.client.app):
        kind = RULES[(method, path)]
        for who, expected in KINDS[kind].items():
            r = world.client.request(**build_request(world, method, path, who, kind))
            fine = (r.status_code not in (401, 403, 404) and r.status_code < 500) if expected == OK else r.status_code == expected
            if not fine:
                wrong.append((method, path, who, expected, r.status_code, r.text[:200]))
            elif r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            if expected == 401:
                assert r.headers["www-authenticate"] == "Bearer"
    assert wrong == []


def test_bad_and_revoked_keys_are_401_everywhere(world: World) -> None:
    from core.db import session_scope
    from core.identity import create_key, find_user, revoke_key

    with session_scope() as db:
        key, revoked = create_key(db, find_user(db, "owner"), "soon revoked")
        revoke_key(db, key.id)
    owner = world.keys["owner"]
    bad = {
        "revoked": revoked,
        "tampered": owner[:-4] + ("AAAA" if not owner.endswith("AAAA") else "BBBB"),
        "unknown id": "tq_" + "0" * 24 + owner.split("_", 2)[2],
        "garbage": "hello",
        "empty": "",
    }
    for method, path in app_routes(world.client.app):
        if RULES[(method, path)] == "public":
            continue
        for name, token in bad.items():
            req = build_request(world, method, path, "none", RULES[(method, path)])
            req["headers"] = {"Authorization": f"Bearer {token}"}
            r = world.client.request(**req)
            assert r.status_code == 401, (method, path, name, r.text)
        basic = build_request(world, method, path, "none", RULES[(method, path)])
        basic["headers"] = {"Authorization": f"Basic {owner}"}
        assert world.client.request(**basic).status_code == 401, (method, path)


def test_lists_show_only_what_the_caller_may_see(world: World) -> None:
    c, ids = world.client, world.ids

    def listed(who: str, url: str) -> set[str]:
        r = c.get(url, headers=world.headers(who), params={"limit": 100})
        assert r.status_code == 200, r.text
        return {x["id"] for x in r.json()["data"]}

    assert ids["job_id"] in listed("owner", "/v1/fine_tuning/jobs")
    assert ids["job_id"] in listed("teammate", "/v1/fine_tuning/jobs")
    assert ids["job_id"] in listed("admin", "/v1/fine_tuning/jobs")
    assert listed("stranger", "/v1/fine_tuning/jobs") == set()
    assert ids["file_id"] in listed("owner", "/v1/files") and ids["file_id"] in listed("admin", "/v1/files")
    assert listed("teammate", "/v1/files") == set() and listed("stranger", "/v1/files") == set()
    # A cursor naming someone else's job reads like one that does not exist.
    for url, after in (("/v1/fine_tuning/jobs", ids["job_id"]), ("/v1/files", ids["file_id"])):
        r = c.get(url, headers=world.headers("stranger"), params={"after": after})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after"


def test_another_users_file_cannot_be_trained_on(world: World) -> None:
    for who in ("teammate", "stranger"):
        r = world.client.post("/v1/fine_tuning/jobs", headers=world.headers(who),
                              json={"model": "tiny-llama", "training_file": world.ids["file_id"]})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "training_file" and err["code"] == "file_not_found"
        assert r.json() != {} and "owner" not in err["message"]


def test_not_found_does_not_tell_foreign_from_missing(world: World) -> None:
    c, h = world.client, world.headers("stranger")
    foreign = c.get(f"/v1/fine_tuning/jobs/{world.ids['job_id']}", headers=h).json()["error"]
    missing = c.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000", headers=h).json()["error"]
    assert foreign["code"] == missing["code"] == "not_found" and foreign["type"] == missing["type"]
    assert foreign["message"].replace(world.ids["job_id"], "X") == missing["message"].replace("ftjob-000000000000000000000000", "X")


def test_teammate_cannot_cancel_and_the_job_is_unchanged(world: World) -> None:
    job_id = world.fresh_job()
    r = world.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=world.headers("teammate"))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert world.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=world.headers("owner")).json()["status"] == "queued"
    r = world.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=world.headers("admin"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_admin_routes_manage_users_and_keys(world: World) -> None:
    c, h = world.client, world.headers("admin")
    user = c.post("/v1/admin/users", headers=h, json={"name": "dora", "role": "member", "team": "red"}).json()
    assert user["name"] == "dora" and user["team"] == "red" and user["role"] == "member"
    assert c.post("/v1/admin/users", headers=h, json={"name": "dora"}).status_code == 409
    assert c.post("/v1/admin/users", headers=h, json={"name": "x y"}).json()["error"]["param"] == "name"
    created = c.post(f"/v1/admin/users/{user['id']}/keys", headers=h, json={"name": "laptop"}).json()
    token = created["key"]
    assert token.startswith(created["prefix"] + "_") and created["revoked_at"] is None
    dora = {"Authorization": f"Bearer {token}"}
    # Dora is in team red: she sees the owner's job, and only through her key.
    assert c.get(f"/v1/fine_tuning/jobs/{world.ids['job_id']}", headers=dora).status_code == 200
    keys = c.get(f"/v1/admin/users/{user['id']}/keys", headers=h).json()["data"]
    assert [k["id"] for k in keys] == [created["id"]] and "key" not in keys[0]
    assert c.post(f"/v1/admin/keys/{created['id']}/revoke", headers=h).json()["revoked_at"] is not None
    assert c.get("/v1/models", headers=dora).status_code == 401
    assert c.post("/v1/admin/keys/key-nope/revoke", headers=h).status_code == 404
    assert c.get("/v1/admin/users/user-nope", headers=h).status_code == 404


def test_keys_are_stored_hashed(world: World) -> None:
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import ApiKey

    with session_scope() as db:
        stored = [(k.prefix, k.token_sha256) for k in db.scalars(select(ApiKey))]
    for token in world.keys.values():
        assert not any(token in prefix or token in digest for prefix, digest in stored)
        assert any(token.startswith(prefix + "_") for prefix, _ in stored)
