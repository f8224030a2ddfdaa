"""Production shapes on real processes: artifacts in an S3 bucket (moto_server), and a PostgreSQL
restart (a throwaway cluster of the test's own) in the middle of a running job."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, Stack, _stop, dump_logs, reverse_dataset, start_stack
from tests.s3server import bucket_keys, s3_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(c: httpx.Client, text: str) -> str:
    r = c.post("/v1/files", files={"file": ("train.jsonl", text.encode(), "application/jsonl")}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["status"] == "processed", r.text
    return r.json()["id"]


def create_job(c: httpx.Client, file_id: str, steps: int, checkpoint_every: int | None = None) -> str:
    r = c.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "method": {"type": "lora", "lora": {"r": 4, "alpha": 8}},
        "hyperparameters": {"max_steps": steps, "batch_size": 2},
        **({"schedule": {"checkpoint_every_steps": checkpoint_every}} if checkpoint_every else {}),
    })
    assert r.status_code == 200, r.text
    return r.json()["id"]


def wait_job(stack: Stack, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    with stack.client() as c:
        while time.monotonic() < deadline:
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}")
            if r.status_code == 200 and r.json()["status"] in TERMINAL:
                return r.json()
            time.sleep(0.5)
    pytest.fail(f"job {job_id} did not end in {timeout}s\n{dump_logs(stack)}")


def job_events(c: httpx.Client, job_id: str) -> list[dict]:
    events, after = [], None
    while True:
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100, **({"after": after} if after else {})}).json()
        events.extend(page["data"])
        if not page["has_more"]:
            return list(reversed(events))  # pages are newest first
        after = page["data"][-1]["id"]


# -- S3 ---------------------------------------------------------------------------------------


def test_job_through_api_and_worker_with_s3_storage(tmp_path: Path, redis_url: str, tiny_model_dir: Path,
                                                     s3_endpoint: str) -> None:
    db_url = f"sqlite:///{tmp_path / 'tuneq.db'}"
    env = s3_env(s3_endpoint)
    # The deployment's own first step: migrate and create the bucket.
    migrate = subprocess.run([sys.executable, "-m", "core.migrate"], cwd=ROOT, capture_output=True, text=True,
                             env={**env, "TUNEQ_DATABASE_URL": db_url, "TUNEQ_HOME": str(tmp_path / "home"),
                                  "PATH": "/usr/bin:/bin"})
    assert migrate.returncode == 0 and "created bucket" in migrate.stdout, migrate.stdout + migrate.stderr
    # The worker gets a cache of its own: as on another host, it must fetch the file from the bucket.
    gpu_host_cache = tmp_path / "gpu-host-cache"
    stack = start_stack(tmp_path, db_url, redis_url, tiny_model_dir.parent, extra_env=env,
                        worker_env={"TUNEQ_STORAGE_CACHE_DIR": str(gpu_host_cache)})
    try:
        with stack.client() as c:
            file_id = upload(c, reverse_dataset(16, seed=5))
            job_id = create_job(c, file_id, steps=3)
            job = wait_job(stack, job_id)
            assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"

            arts = {a["name"]: a for a in c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]}
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter.tar.gz/content")
            assert r.status_code == 200, r.text
            assert hashlib.sha256(r.content).hexdigest() == arts["adapter.tar.gz"]["sha256"] == r.headers["x-content-sha256"]
            with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
                assert any(n.endswith("adapter_model.safetensors") for n in tar.getnames())
            manifest = c.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts/final/manifest.json/content")
            assert manifest.status_code == 200 and "files" in json.loads(manifest.content)
    finally:
        _stop(stack.worker)
        _stop(stack.api)

    keys = bucket_keys(s3_endpoint, env["TUNEQ_STORAGE_URL"])
    assert f"tuneq/files/{file_id}.jsonl" in keys
    # The model's files are stored once; its archive is a recipe over them, streamed by the API.
    assert {f"tuneq/jobs/{job_id}/adapter.tar.gz.index.json", f"tuneq/jobs/{job_id}/final/manifest.json"} <= set(keys)
    assert {f"tuneq/jobs/{job_id}/{name}" for name in arts if name.startswith("final/")} <= set(keys)
    # TensorBoard curves are stored per attempt (tensorboard-<attempt>.tar.gz): a re-run never rewrites a key.
    assert "tensorboard.tar.gz" in arts
    assert any(k.startswith(f"tuneq/jobs/{job_id}/tensorboard-") for k in keys), "TensorBoard logs not in the bucket"
    local_store = stack.home / "artifacts"
    assert not local_store.exists() or not any(p.is_file() for p in local_store.rglob("*")), "wrote to the local store"
    assert list(gpu_host_cache.rglob(f"{file_id}.jsonl")), "the worker did not fetch the training file from the bucket"


# -- PostgreSQL restart ---------------------------------------------------------------------------


class Poller(threading.Thread):
    """GETs the job all through the restart, as a dashboard would; records every answer."""

    def __init__(self, stack: Stack, job_id: str):
        super().__init__(daemon=True)
        self.stack, self.job_id = stack, job_id
        self.answers: list[tuple[int, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        with self.stack.client() as c:
            while not self.stopped.is_set():
                try:
                    r = c.get(f"/v1/fine_tuning/jobs/{self.job_id}")
                    code = r.json().get("error", {}).get("code") if r.status_code != 200 else r.json()["status"]
                    self.answers.append((r.status_code, str(code)))
                except httpx.HTTPError as exc:
                    self.answers.append((0, type(exc).__name__))
                time.sleep(0.2)


# Long enough that the job is still training when the database comes back (~5 s of outage and
# waiting). The steps are paced by a sleep rather than made many: a paced step costs almost no CPU,
# and how long the job lasts no longer depends on how fast the machine trains.
STEPS = 200
STEP_SLEEP_S = "0.05"


def test_job_and_api_ride_out_a_postgres_restart(tmp_path: Path, redis_url: str, tiny_model_dir: Path) -> None:
    from tests.pgcluster import PgCluster
    from core.ports import free_port

    cluster = PgCluster(free_port())
    cluster.init()
    cluster.start()
    stack = None
    try:
        url = cluster.create_database("tuneq")
        stack = start_stack(tmp_path, url, redis_url, tiny_model_dir.parent, extra_env={
            "TUNEQ_DB_CONNECT_RETRY_S": "2", "TUNEQ_LEASE_TTL_S": "60", "TUNEQ_ACCELERATE_LAUNCH": "false",
            "TUNEQ_TEST_STEP_SLEEP_S": STEP_SLEEP_S,
        })
        with stack.client() as c:
            job_id = create_job(c, upload(c, reverse_dataset(32, seed=6)), steps=STEPS)
            deadline = time.monotonic() + 180
            while not any(e["type"] == "metrics" for e in job_events(c, job_id)):
                assert time.monotonic() < deadline, f"no training step\n{dump_logs(stack)}"
                time.sleep(0.3)

            poller = Poller(stack, job_id)
            poller.start()
            time.sleep(0.5)
            before = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
            assert before["status"] == "running", f"the job ended before the restart: {before['status']}"
            stopped_at = time.time()
            cluster.stop()  # fast shutdown: every open connection of API and worker is cut
            time.sleep(3)
            cluster.start()
            time.sleep(1)
            poller.stopped.set()
            poller.join(60)

            r = c.get(f"/v1/fine_tuning/jobs/{job_id}")
            assert r.status_code == 200, r.text

        job = wait_job(stack, job_id)
        assert job["status"] == "succeeded", f"{job}\n{dump_logs(stack)}"
        # On an idle machine the trainer may finish while the database is down; the worker then
        # records the end only after the restart, which is the ride-out this test is about.
        assert job["finished_at"] >= int(stopped_at), (job["finished_at"], stopped_at)
        bad = [a for a in poller.answers if a[0] not in (200, 503) or (a[0] == 503 and a[1] != "database_unavailable")]
        assert not bad, f"answers other than 200 or a 503 'database_unavailable': {bad}\n{dump_logs(stack)}"
        assert poller.answers and poller.answers[-1][0] == 200, poller.answers
        with stack.client() as c:
            events = job_events(c, job_id)
        starts = [e for e in events if e["message"] in ("Trainer started.", "Resuming from the latest checkpoint.")]
        assert len(starts) == 1, f"the trainer was restarted: {[e['message'] for e in events]}\n{dump_logs(stack)}"
        steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
        assert steps and max(steps) == STEPS and len(steps) == len(set(steps)), steps
    finally:
        if stack is not None:
            _stop(stack.worker)
            _stop(stack.api)
        cluster.destroy()
