"""Helpers of the DB and worker integration tests: settings per test, jobs, a worker process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from tests.conftest import reset_caches
from trainer.watchdog import alive as process_alive  # noqa: F401 - the tests' name for it

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str, redis_url: str) -> Iterator[dict[str, str]]:
    """TUNEQ_* settings for tests that need the database and the queue but no model."""
    env = {
        "TUNEQ_HOME": str(tmp_path / "home"),
        "TUNEQ_DATABASE_URL": database_url,
        "TUNEQ_REDIS_URL": redis_url,
        "TUNEQ_ACCELERATE_LAUNCH": "false",
        "TUNEQ_HEARTBEAT_S": "0.5",
        "TUNEQ_LEASE_TTL_S": "30",
        # Many of these jobs run until the test pauses or cancels them: a short sleep after each
        # step (trainer.loop) keeps such a trainer from taking a whole core meanwhile.
        "TUNEQ_TEST_STEP_SLEEP_S": "0.05",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_caches()
    yield env
    reset_caches()


@pytest.fixture
def db(db_env: dict[str, str]) -> Iterator[Session]:
    from core.db import get_sessionmaker

    session = get_sessionmaker()()
    yield session
    session.close()


def chat_lines(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "maple", "robot"]
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        rows.append(json.dumps({"messages": [
            {"role": "user", "content": f"Reverse: {w}"},
            {"role": "assistant", "content": w[::-1]},
        ]}))
    return "\n".join(rows) + "\n"


def store_file(db: Session, text: str, filename: str = "train.jsonl") -> Any:
    """A processed upload, stored the way the API stores it."""
    import io

    from core.models import File, new_id
    from core.storage import get_storage

    file_id = new_id("file")
    key = f"files/{file_id}.jsonl"
    size, digest = get_storage().put_stream(key, io.BytesIO(text.encode()))
    f = File(id=file_id, filename=filename, bytes=size, storage_key=key, sha256=digest, status="processed")
    db.add(f)
    db.flush()
    return f


def make_job(db: Session, model: str = "tiny-llama", *, steps: int = 4, examples: int = 16,
             checkpoint_every: int | None = None, log_every: int = 1, method: str = "lora", suffix: str | None = None,
             training_text: str | None = None, **spec_extra: Any) -> Any:
    """A queued job whose spec holds the training file's id, as the API writes it; committed."""
    from core.jobs import create_job

    training = store_file(db, training_text if training_text is not None else chat_lines(examples))
    spec: dict[str, Any] = {
        "model": model,
        "method": method,
        "training_file": training.id,
        "hyperparameters": {"max_steps": steps, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0},
        "schedule": {"log_every_steps": log_every, "checkpoint_every_steps": checkpoint_every},
        "suffix": suffix,
        **spec_extra,
    }
    if method == "lora":
        spec["lora"] = {"r": 4, "alpha": 8}
    job = create_job(db, spec=spec, model=model, method=method, training_file=training, suffix=suffix)
    db.commit()
    return job


def wait_for(predicate: Callable[[], Any], timeout: float, what: str | Callable[[], str],
             interval: float = 0.2) -> Any:
    """what: a callable is called at the timeout, so a log in it shows the end of the wait, not its start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def job_status(job_id: str) -> str:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.status


class CeleryWorker:
    """`celery -A worker.app worker …` as a real subprocess with the test's TUNEQ_* environment."""

    def __init__(self, log_path: Path, slots: int = 1, extra_env: dict[str, str] | None = None):
        self.log_path = log_path
        env = {**os.environ, **(extra_env or {}), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "tuneq", "--pool", "threads",
             "--concurrency", str(slots), "--loglevel", "INFO", "--without-gossip", "--without-mingle",
             "--without-heartbeat", "--hostname", f"test-{os.getpid()}-{time.monotonic_ns()}@%h"],
            cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: "ready." in self.log() or self.proc.poll() is not None, timeout, "the celery worker")
        assert self.proc.poll() is None, f"worker exited:\n{self.log()}"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def celery_worker(tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    """Start workers on demand (the test's env must be set first); all are stopped afterwards."""
    started: list[CeleryWorker] = []

    def start(slots: int = 1, **extra_env: str) -> CeleryWorker:
        w = CeleryWorker(tmp_path / f"worker-{len(started)}.log", slots, extra_env)
        started.append(w)
        w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def worker_env(db_env: dict[str, str], tiny_model_dir: Path) -> dict[str, str]:
    """db_env plus a tiny model; the trainer runs without `accelerate launch` (faster to start)."""
    return {**db_env, "model": str(tiny_model_dir)}


def events_of(job_id: str, type: str | None = None) -> list[Any]:
    from sqlalchemy import select

    from core.db import session_scope
    from core.models import JobEvent

    with session_scope() as s:
        q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        if type is not None:
            q = q.where(JobEvent.type == type)
        return list(s.scalars(q).all())


def trainer_pid(job_id: str) -> int:
    started = [e for e in events_of(job_id, "message") if e.data and "pid" in e.data]
    assert started, "no 'Trainer started' event"
    return started[-1].data["pid"]


def trainer_processes(work_dir: Path) -> list[int]:
    """Live processes whose command line runs the trainer on work_dir, and standby trainers
    (`trainer standby`, worker.standby) that took its job and work in it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and process_alive(int(entry.name)):
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                cwd = os.readlink(entry / "cwd") if "standby" in argv else None
            except OSError:
                continue
            if "trainer" in argv and (str(work_dir) in argv or cwd == str(work_dir)):
                pids.append(int(entry.name))
    return pids


def upload_scope(boundary: str, key: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    """The ASGI scope of a multipart POST /v1/files, for tests that feed its body chunk by chunk."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/files", "raw_path": b"/v1/files", "root_path": "", "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
                    (b"authorization", f"Bearer {key}".encode()), *headers],
        "client": ("127.0.0.1", 1), "server": ("testserver", 80),
    }


class ChunkedBody:
    """A client sending `chunks` as an ASGI request body, pausing before chunk `pause_at` until
    `gate` is set; `consumed` counts the chunks the app took, `answer` collects what it sent."""

    def __init__(self, chunks: list[bytes], pause_at: int | None = None):
        import asyncio

        self.chunks, self.pause_at, self.consumed = chunks, pause_at, 0
        self.gate = asyncio.Event()
        self.answer: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        import asyncio

        if self.consumed == self.pause_at:
            await self.gate.wait()
        if self.consumed < len(self.chunks):
            self.consumed += 1
            return {"type": "http.request", "body": self.chunks[self.consumed - 1], "more_body": self.consumed < len(self.chunks)}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.answer.append(message)

    def status(self) -> int:
        return self.answer[0]["status"]

    def json(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.answer[1:]))
