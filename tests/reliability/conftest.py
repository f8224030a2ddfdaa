"""Real processes for fault tests: `python -m worker` (killable), uvicorn, a short lease TTL.

Jobs are created through core (as the API does) unless the test is about the API; the trainer
runs without `accelerate launch` so that each start costs seconds, not tens of seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import reset_caches
from tests.integration.conftest import events_of, job_status, make_job, wait_for  # noqa: F401 - re-exported

ROOT = Path(__file__).resolve().parents[2]

# Fast failure detection, so a killed worker's job is back in the queue within seconds.
FAST = {
    "TUNEQ_ACCELERATE_LAUNCH": "false",
    "TUNEQ_HEARTBEAT_S": "0.5",
    "TUNEQ_LEASE_TTL_S": "4",
    "TUNEQ_DISPATCH_INTERVAL_S": "0.5",
    "TUNEQ_REGISTRY_TTL_S": "5",
    "TUNEQ_RETRY_BACKOFF_S": "0.5",
}


# For tests about anything but lease expiry: a 4 s lease made a worker whose process stalled under
# load (2 cores, several trainers starting) look dead, so its running job was re-queued mid-test.
STEADY_LEASE = {"TUNEQ_LEASE_TTL_S": "30"}

# For workers whose jobs a test keeps running until it pauses, preempts or cancels them, or kills
# them mid-run: each step is followed by a sleep (trainer.loop), so such a trainer waits for the
# test instead of taking a core from the rest of the run. A tiny step computes for tens of
# milliseconds: with a 0.2 s sleep a trainer that only has to be running costs a fraction of a core.
IDLE_STEPS = {"TUNEQ_TEST_STEP_SLEEP_S": "0.2"}


@pytest.fixture
def rel_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_migrated_url: str, redis_url: str,
            tiny_model_dir: Path) -> Iterator[dict[str, str]]:
    """TUNEQ_* for this test (PostgreSQL at head, its Redis db, fast leases), set in this process too."""
    pg_url = pg_migrated_url
    env = {
        "TUNEQ_HOME": str(tmp_path / "home"),
        "TUNEQ_DATABASE_URL": pg_url,
        "TUNEQ_REDIS_URL": redis_url,
        "TUNEQ_MODEL_ROOTS": json.dumps([str(tiny_model_dir.parent)]),
        **FAST,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_caches()
    yield {**env, "model": str(tiny_model_dir)}
    reset_caches()


@pytest.fixture
def db(rel_env: dict[str, str]) -> Iterator[Any]:
    from core.db import get_sessionmaker

    session = get_sessionmaker()()
    yield session
    session.close()


class Proc:
    """A child process with its own log, stopped gently or killed outright."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        self.log_path = log
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        full_env.pop("model", None)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def workers(tmp_path: Path, rel_env: dict[str, str]) -> Iterator[Callable[..., Proc]]:
    """Start `python -m worker` processes; each is SIGKILLed (not stopped) at the end, then its
    orphaned trainers too, so a failing test leaves nothing running."""
    from worker.process import kill_orphans

    started: list[Proc] = []

    def start(gpus: int = 1, wait: bool = True, **extra: str) -> Proc:
        n = len(started)
        w = Proc([sys.executable, "-m", "worker", "--gpus", str(gpus), "--loglevel", "INFO",
                  "--hostname", f"rel{n}-{os.getpid()}@%h"], tmp_path / f"worker-{n}.log", {**rel_env, **extra})
        started.append(w)
        if wait:
            wait_for(lambda: "ready." in w.log() or w.proc.poll() is not None, 60, "the worker to start")
            assert w.proc.poll() is None, w.log()
            wait_for(lambda: _registered(w.pid, extra.get("TUNEQ_REDIS_URL")), 30, f"the worker's registration\n{w.log()}")
        return w

    yield start
    for w in started:
        w.kill()
    time.sleep(0.2)
    kill_orphans()


def _registered(pid: int, redis_url: str | None) -> bool:
    import redis

    from core.settings import get_settings
    from core.workers import PREFIX

    client = redis.Redis.from_url(redis_url or get_settings().redis_url)
    return any(k.decode().endswith(f":{pid}") for k in client.scan_iter(PREFIX + "*"))


def trainer_starts(job_id: str) -> list[Any]:
    """The 'Trainer started' / 'Resuming' events: one per run of the trainer."""
    return [e for e in events_of(job_id, "message") if e.data and "pid" in e.data]


def resumed_steps(job_id: str) -> list[int | None]:
    return [e.data.get("resumed_from_step") for e in events_of(job_id, "start")]


def assert_never_twice_at_once(job_id: str) -> None:
    """Each run's lease attempt is new, and no run started before the previous one ended: a run
    ends with the status event that leaves `running` (or the reaper's requeue)."""
    starts = trainer_starts(job_id)
    attempts = [e.data["attempt"] for e in starts]
    assert attempts == sorted(set(attempts)), f"lease attempts repeat: {attempts}"
    evs = events_of(job_id)
    running = False
    for e in evs:
        if e.type == "message" and e.data and "pid" in e.data:
            assert not running, f"run started while another was running: {[(x.type, x.message) for x in evs]}"
            running = True
        elif e.type == "status" and e.data and e.data.get("from") in ("running", "cancelling"):
            running = False


def killed_trainer_gone(pid: int) -> bool:
    from tests.integration.conftest import process_alive

    return not process_alive(pid)
