"""The database connection rides out a PostgreSQL restart (a throwaway cluster of the test's own),
and the API answers an outage with 503 + Retry-After instead of a 500."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from core.settings import Settings
from tests.conftest import reset_caches
from tests.pgcluster import PgCluster
from core.ports import free_port

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    c = PgCluster(free_port())
    c.init()
    c.start()
    yield c
    c.destroy()


def test_pool_settings_reach_the_engine(cluster: PgCluster) -> None:
    from core.db import make_engine

    engine = make_engine(cluster.url(), Settings(db_pool_size=3, db_max_overflow=2, db_pool_recycle_s=90))
    try:
        # The overflow is kept open like the rest (core.db.make_engine): one pool of both together.
        assert (engine.pool.size(), engine.pool._max_overflow, engine.pool._recycle, engine.pool._pre_ping) == (5, 0, 90, True)
    finally:
        engine.dispose()


def test_pooled_connections_and_new_ones_survive_a_restart(cluster: PgCluster) -> None:
    from core.db import make_engine

    engine = make_engine(cluster.url(), Settings(db_connect_retry_s=20))
    try:
        with engine.connect() as c:  # leaves a pooled connection that the restart will kill
            assert c.execute(text("select 1")).scalar() == 1
        cluster.stop()
        result: list[object] = []
        # Asked while the server is down: the connect retry waits for it instead of failing.
        t = threading.Thread(target=lambda: result.append(_select_one(engine)))
        t.start()
        time.sleep(2)
        assert t.is_alive(), f"gave up while the server was down: {result}"
        cluster.start()
        t.join(30)
        assert result == [1]
    finally:
        engine.dispose()
        if not (cluster.data / "postmaster.pid").exists():
            cluster.start()


def test_a_write_cut_off_by_the_server_is_rolled_back_and_retried(cluster: PgCluster, tmp_path: Path) -> None:
    """The server ends the connection in the middle of a write transaction (what a restart does to
    the worker's event pump): the rollback that recovers must not itself raise, so the runner's
    retry stores the write once the connection is back."""
    from types import SimpleNamespace

    from sqlalchemy.orm import sessionmaker

    from core.db import make_engine
    from worker.runner import JobRun

    engine = make_engine(cluster.url(), Settings(db_connect_retry_s=5))
    try:
        with engine.begin() as c:
            c.execute(text("create table if not exists cut_writes (n int)"))
            c.execute(text("delete from cut_writes"))
        db = sessionmaker(engine)()
        run = SimpleNamespace(settings=Settings(home=tmp_path, lease_ttl_s=60), db=db, job_id="ftjob-cut")
        tries: list[int] = []

        def write() -> None:
            tries.append(len(tries))
            db.execute(text("insert into cut_writes values (:n)"), {"n": len(tries)})
            if len(tries) == 1:  # the server cuts this transaction before it commits
                pid = db.execute(text("select pg_backend_pid()")).scalar()
                with engine.connect() as admin:
                    admin.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
                    admin.commit()
                db.execute(text("select 1"))  # the statement that finds the connection gone
            db.commit()

        JobRun.with_db(run, write)
        db.close()
        with engine.connect() as c:
            assert c.execute(text("select n from cut_writes")).scalars().all() == [2]
        assert tries == [0, 1]
    finally:
        engine.dispose()


def _select_one(engine) -> object:  # noqa: ANN001
    try:
        with engine.connect() as c:
            return c.execute(text("select 1")).scalar()
    except Exception as exc:  # noqa: BLE001 - reported to the test thread
        return exc


def test_api_answers_503_while_the_database_is_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.main import create_app

    # A port nothing listens on: the database is down for this whole test.
    monkeypatch.setenv("TUNEQ_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    monkeypatch.setenv("TUNEQ_HOME", str(tmp_path))
    monkeypatch.setenv("TUNEQ_DB_CONNECT_RETRY_S", "0.3")
    reset_caches()
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as c:
            # Well-formed, so that checking it needs the database.
            auth = {"Authorization": f"Bearer tq_{'ab' * 12}_{'x' * 30}"}
            read = c.get("/v1/fine_tuning/jobs", headers=auth)  # retried by the API, then given up
            upload = c.post("/v1/files", headers=auth, files={"file": ("t.jsonl", b"{}\n")}, data={"purpose": "fine-tune"})
            health = c.get("/healthz")
        for r in (read, upload):
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"] == "2"
        assert health.status_code == 503 and health.json()["database"].startswith("error")
    finally:
        reset_caches()


def test_api_runs_a_read_again_once_the_database_is_back(cluster: PgCluster, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from api.main import create_app
    from core.migrate import upgrade_head
    from tests.conftest import create_user_with_key

    url = cluster.create_database(f"api_{free_port()}")
    upgrade_head(url)
    monkeypatch.setenv("TUNEQ_DATABASE_URL", url)
    monkeypatch.setenv("TUNEQ_HOME", str(tmp_path))
    # Shorter than the outage: only the API's own retry of the read can bridge it.
    monkeypatch.setenv("TUNEQ_DB_CONNECT_RETRY_S", "0.3")
    reset_caches()
    try:
        key = create_user_with_key("reader", "member")[1]
        with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
            assert c.get("/v1/fine_tuning/jobs").status_code == 200
            cluster.stop()
            answers: list[object] = []
            t = threading.Thread(target=lambda: answers.append(c.get("/v1/fine_tuning/jobs")))
            t.start()
            time.sleep(1.0)
            cluster.start()
            t.join(30)
        assert answers and answers[0].status_code == 200, answers[0].text  # type: ignore[attr-defined]
    finally:
        reset_caches()
        if not (cluster.data / "postmaster.pid").exists():
            cluster.start()


def test_replicas_migrating_at_once_all_succeed(pg_url: str) -> None:
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT

    # Processes, as API replicas starting together are; each runs what the container runs first.
    procs = [subprocess.Popen([sys.executable, "-m", "core.migrate", "--url", pg_url], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [(p.wait(120), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    assert all(code == 0 for code, _ in outs), outs
