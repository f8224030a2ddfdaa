"""Restarts of the services around a running job: Redis (an embedded one of the test's own, never
the machine's) and the API. The job finishes and nothing accepted is lost."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from core import states
from core.queue import enqueue_job
from tests.conftest import reset_caches
from tests.integration.conftest import chat_lines
from tests.reliability.conftest import (
    IDLE_STEPS, STEADY_LEASE, Proc, assert_never_twice_at_once, events_of, job_status, make_job, trainer_starts, wait_for,
)
from core.ports import free_port
from tuneq.embedded import EmbeddedRedis


def test_redis_restart_mid_job_loses_nothing(db: Session, rel_env, workers, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    redis = EmbeddedRedis(workdir=tmp_path / "redis")
    url = redis.start()
    try:
        monkeypatch.setenv("TUNEQ_REDIS_URL", url)
        reset_caches()
        # Paced (IDLE_STEPS): the steps after the first metrics outlast the restart by seconds.
        running = make_job(db, rel_env["model"], steps=40, examples=64, checkpoint_every=5, log_every=5)
        waiting = make_job(db, rel_env["model"], steps=4)
        w = workers(TUNEQ_REDIS_URL=url, **STEADY_LEASE, **IDLE_STEPS)
        enqueue_job(running.id)
        wait_for(lambda: events_of(running.id, "metrics"), 120, f"training\n{w.log()}")
        enqueue_job(waiting.id)  # only one GPU: this message is deferred and re-sent, then lost below

        redis.stop()  # no persistence: queue, unacked messages, markers and registrations are gone
        time.sleep(2)
        redis = EmbeddedRedis(port=redis.port, workdir=tmp_path / "redis")
        redis.start()

        for job in (running, waiting):
            wait_for(lambda: job_status(job.id) in states.TERMINAL, 180, f"{job.id} to end\n{w.log()}")
            assert job_status(job.id) == states.SUCCEEDED, w.log()
            assert_never_twice_at_once(job.id)
        assert len(trainer_starts(running.id)) == 1, "the running job was not disturbed"
    finally:
        redis.stop()


def _auth_headers() -> dict[str, str]:
    # An admin key for the API; without the key helper (a tree without auth) requests go keyless.
    try:
        from tests.conftest import create_user_with_key
    except ImportError:
        return {}
    return {"Authorization": f"Bearer {create_user_with_key('reliability-admin', 'admin')[1]}"}


def test_api_restart_mid_job_loses_nothing(db: Session, rel_env, workers, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def api() -> Proc:
        p = Proc([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
                 tmp_path / "api.log", rel_env)
        wait_for(lambda: _healthy(base) or p.proc.poll() is not None, 180, "the API")
        assert p.proc.poll() is None, p.log()
        return p

    a = api()
    try:
        w = workers(**STEADY_LEASE)
        headers = _auth_headers()
        with httpx.Client(base_url=base, timeout=120, headers=headers) as c:
            f = c.post("/v1/files", files={"file": ("t.jsonl", chat_lines(64).encode())}, data={"purpose": "fine-tune"})
            assert f.status_code == 200, f.text
            body = {"model": "tiny-llama", "training_file": f.json()["id"], "method": {"type": "lora"},
                    "hyperparameters": {"max_steps": 20, "batch_size": 2, "max_seq_len": 32},
                    "schedule": {"checkpoint_every_steps": 5, "log_every_steps": 5}}
            r = c.post("/v1/fine_tuning/jobs", json=body)
            assert r.status_code == 200, r.text
            job_id = r.json()["id"]
            too_big = c.post("/v1/fine_tuning/jobs", json={**body, "gpus": 2})
            assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "gpus", too_big.text
        wait_for(lambda: events_of(job_id, "metrics"), 120, f"training\n{w.log()}")
        a.kill()
        time.sleep(1)
        a = api()
        with httpx.Client(base_url=base, timeout=120, headers=headers) as c:
            wait_for(lambda: c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] in states.TERMINAL, 180,
                     f"the job to end\n{w.log()}")
            job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            assert job["status"] == states.SUCCEEDED and job["fine_tuned_model"], job
            listed = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
            assert len(listed) == min(100, len(events_of(job_id)))
        assert len(trainer_starts(job_id)) == 1
    finally:
        a.kill()


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
