"""The whole stack as real processes: uvicorn serving the API and a Celery worker.

Tests that only submit jobs and read them back share one stack per test process (`stack`, a user
of the test's own on `shared_stack`): starting uvicorn and a worker costs more than a short job.
Tests that stop, restart or reconfigure a part start their own (start_stack).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import redis_db, sqlite_copy
from tests.datasets import reverse_dataset  # noqa: F401 - re-exported for the e2e tests
from core.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    url: str
    env: dict[str, str]
    home: Path
    api: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    key: str

    def client(self) -> httpx.Client:
        # A fresh API loads the tokenizer at its first upload: on a busy machine that alone has taken
        # more than 30 s. The tests check answers, not latency.
        return httpx.Client(base_url=self.url, timeout=120, headers={"Authorization": f"Bearer {self.key}"})


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"API exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"API not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _member_key(database_url: str, name: str = "e2e-user", team: str = "e2e") -> str:
    """A member's key (not an admin's): the whole path must work without admin rights."""
    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.identity import create_key, create_user

    engine = make_engine(database_url)
    try:
        with Session(engine) as db:
            _, token = create_key(db, create_user(db, name, "member", team), "e2e")
            db.commit()
    finally:
        engine.dispose()
    return token


def start_stack(tmp_path: Path, database_url: str, redis_url: str, models_root: Path,
                extra_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None) -> Stack:
    """API and worker as processes; extra_env goes to both, worker_env to the worker alone
    (e.g. a storage cache of its own, as on another host)."""
    from core.migrate import upgrade_head

    home = tmp_path / "home"
    home.mkdir(parents=True, exist_ok=True)
    upgrade_head(database_url)
    key = _member_key(database_url)
    port = free_port()
    env = {
        **os.environ,
        "TUNEQ_HOME": str(home),
        "TUNEQ_DATABASE_URL": database_url,
        "TUNEQ_REDIS_URL": redis_url,
        "TUNEQ_MODEL_ROOTS": json.dumps([str(models_root)]),
        "TUNEQ_HEARTBEAT_S": "1",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    api_log = home / "api.log"
    worker_log = home / "worker.log"
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=open(api_log, "wb"), stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker"], cwd=ROOT, env={**env, **(worker_env or {})}, stdout=open(worker_log, "wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, api, api_log)
    except Exception:
        _stop(api)
        _stop(worker)
        raise
    return Stack(url=url, env=env, home=home, api=api, worker=worker, key=key)


@pytest.fixture(scope="session")
def shared_stack(tmp_path_factory: pytest.TempPathFactory, redis_server_url: str, sqlite_template: Path,
                 tiny_model_dir: Path) -> Iterator[Stack]:
    """One API and worker for this test process, on SQLite and a Redis database of their own (the
    per-test flush of redis_url would empty their queue). The trainer runs without `accelerate
    launch`: the tests about that launch path start it themselves."""
    import redis

    url = f"{redis_server_url.rsplit('/', 1)[0]}/{redis_db(1)}"
    redis.Redis.from_url(url).flushdb()
    tmp = tmp_path_factory.mktemp("stack")
    # The shared stack's worker forks its jobs' trainers from its trainer template, as a worker does
    # by default (test_whole_path checks one did). No standby trainers: only the jobs the template
    # cannot take would use them, and those start fresh here at the same cost.
    s = start_stack(tmp, sqlite_copy(sqlite_template, tmp / "tuneq.db"), url, tiny_model_dir.parent,
                    extra_env={"TUNEQ_ACCELERATE_LAUNCH": "false", "TUNEQ_STANDBY_TRAINERS": "0"})
    yield s
    _stop(s.worker)
    _stop(s.api)
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def chat_server(shared_stack: Stack) -> Iterator[subprocess.Popen[bytes]]:
    """An inference server (`python -m worker.serve`) beside the shared stack's worker, started
    only for the tests that chat; it answers once it has registered."""
    import redis

    from core import inference

    log = shared_stack.home / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "worker.serve"], cwd=ROOT, env=shared_stack.env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    client = redis.Redis.from_url(shared_stack.env["TUNEQ_REDIS_URL"])
    deadline = time.monotonic() + 120
    while not inference.server_entries(client):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(f"the inference server did not register:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    yield proc
    _stop(proc)


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The shared stack as seen by a member of a team of the test's own: its lists start empty."""
    import dataclasses

    tag = secrets.token_hex(4)
    key = _member_key(shared_stack.env["TUNEQ_DATABASE_URL"], f"e2e-{tag}", f"e2e-{tag}")
    return dataclasses.replace(shared_stack, key=key)


@pytest.fixture
def pg_stack(tmp_path: Path, redis_url: str, pg_migrated_url: str, tiny_model_dir: Path) -> Iterator[Stack]:
    """A stack of the test's own on PostgreSQL, running the trainer under `accelerate launch` (the
    production default) so that a cancel must stop the launcher and the trainer under it."""
    # Its job trains until cancelled: paced steps keep it running at little CPU meanwhile.
    s = start_stack(tmp_path, pg_migrated_url, redis_url, tiny_model_dir.parent,
                    extra_env={"TUNEQ_ACCELERATE_LAUNCH": "true", "TUNEQ_TEST_STEP_SLEEP_S": "0.05"})
    yield s
    _stop(s.worker)
    _stop(s.api)


def dump_logs(stack: Stack) -> str:
    parts = []
    for name in ("api.log", "worker.log", "serve.log"):
        p = stack.home / name
        if p.exists():
            parts.append(f"--- {name}\n{p.read_text()[-4000:]}")
    for log in (stack.home / "work").glob("*/trainer.log"):
        parts.append(f"--- {log}\n{log.read_text()[-4000:]}")
    return "\n".join(parts)
