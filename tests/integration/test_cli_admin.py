"""`tuneq admin` on the real database: users, keys that work against the app, revocation, bootstrap."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tuneq import cli


@pytest.fixture
def runner(service_env: dict[str, str]) -> CliRunner:
    return CliRunner()


def one_error_line(result) -> str:  # noqa: ANN001
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_create_user_key_use_and_revoke(runner: CliRunner) -> None:
    from api.main import create_app

    made = runner.invoke(cli.app, ["admin", "create-user", "alice", "--role", "member", "--team", "vision"])
    assert made.exit_code == 0, made.output
    user_id = made.stdout.strip()
    assert user_id.startswith("user-") and "team vision" in made.stderr
    key = runner.invoke(cli.app, ["admin", "create-key", "alice", "--name", "laptop"])
    assert key.exit_code == 0, key.output
    token = key.stdout.strip()
    assert token.startswith("tq_") and "shown only now" in key.stderr
    key_id = key.stderr.split()[1]
    assert key_id.startswith("key-")

    with TestClient(create_app(), headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/v1/files").status_code == 200
        assert c.get("/v1/admin/users").status_code == 403  # a member
        revoked = runner.invoke(cli.app, ["admin", "revoke-key", key_id])
        assert revoked.exit_code == 0 and revoked.stdout.strip() == f"{key_id} revoked"
        assert c.get("/v1/files").status_code == 401
    by_id = runner.invoke(cli.app, ["admin", "create-key", user_id])
    assert by_id.exit_code == 0 and by_id.stdout.strip() != token


def test_admin_errors_are_one_line(runner: CliRunner) -> None:
    assert runner.invoke(cli.app, ["admin", "create-user", "bob"]).exit_code == 0
    cases = [
        (["admin", "create-user", "bob"], "a user named 'bob' exists already"),
        (["admin", "create-user", "carol", "--role", "root"], "role: must be 'admin' or 'member'"),
        (["admin", "create-user", "no spaces"], "is not a valid name"),
        (["admin", "create-key", "nobody"], "no user 'nobody'"),
        (["admin", "revoke-key", "key-nope"], "no API key with id 'key-nope'"),
    ]
    for args, expected in cases:
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in one_error_line(result)


def test_unmigrated_database_is_named(runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    reset_caches()
    line = one_error_line(runner.invoke(cli.app, ["admin", "create-user", "dave"]))
    assert "no such table" in line and "core.migrate" in line


def test_bootstrap_creates_one_admin_once(service_env: dict[str, str]) -> None:
    from core.db import session_scope
    from core.identity import authenticate, bootstrap_admin

    with session_scope() as db:
        token = bootstrap_admin(db)
    assert token is not None
    with session_scope() as db:
        assert bootstrap_admin(db) is None  # a restart shows no second key
        user = authenticate(db, token)
        assert user is not None and user.name == "admin" and user.role == "admin"
