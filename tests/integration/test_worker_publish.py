"""A finished training is published once: the lease outlives a slow publish, and a worker lost
while publishing leaves a job that the next attempt publishes without training again."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import states
from core.archive import INDEX_SUFFIX, Index
from core.db import get_sessionmaker
from core.jobs import reap_stale
from core.models import Artifact, Job
from core.settings import get_settings
from core.storage import get_storage
from tests.conftest import reset_caches
from tests.integration.conftest import ROOT, events_of, make_job
from worker.reaper import ReaperThread
from worker.runner import run_job

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def trainer_runs(job_id: str) -> int:
    """Times a trainer started on the job (its `start` event)."""
    return len(events_of(job_id, "start"))


def assert_published(db: Session, job_id: str) -> None:
    """Every artifact's stored bytes match its listing; the model archive holds the manifest's files."""
    storage = get_storage()
    arts = {a.name: a for a in db.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    manifest = json.loads(storage.path(arts["final/manifest.json"].storage_key).read_bytes())
    assert {f"final/{rel}" for rel in manifest["files"]} <= set(arts)
    for a in arts.values():
        if a.storage_key.endswith(INDEX_SUFFIX):
            content = b"".join(Index.from_json(storage.path(a.storage_key).read_bytes()).stream(storage.iter_bytes))
        else:
            content = storage.path(a.storage_key).read_bytes()
        assert hashlib.sha256(content).hexdigest() == a.sha256 and len(content) == a.bytes, a.name
    archive = arts["adapter.tar.gz"]
    index = Index.from_json(storage.path(archive.storage_key).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(b"".join(index.stream(storage.iter_bytes))), mode="r:gz") as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {f"adapter/{rel}" for rel in manifest["files"]} | {"adapter/manifest.json"}


@SQLITE_ONLY
def test_publishing_longer_than_the_lease_keeps_it(db: Session, worker_env: dict[str, str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Publishing (here slowed to three lease TTLs, as copying gigabytes to a slow store is) runs
    with the trainer gone; the reaper, running all along with the lowered TTL, must not take the
    job back, and the job succeeds after a single trainer run."""
    from worker import runner

    monkeypatch.setenv("TUNEQ_LEASE_TTL_S", "1.5")
    monkeypatch.setenv("TUNEQ_HEARTBEAT_S", "0.3")
    reset_caches()
    ttl = get_settings().lease_ttl_s
    job = make_job(db, worker_env["model"], steps=2)
    real = runner.publish_final
    took = {}

    def slow_publish(storage, j, final):  # noqa: ANN001, ANN202
        t0 = time.monotonic()
        time.sleep(3 * ttl)
        out = real(storage, j, final)
        took["s"] = time.monotonic() - t0
        return out

    monkeypatch.setattr(runner, "publish_final", slow_publish)
    reaper = ReaperThread(interval_s=ttl / 5)
    reaper.start()
    try:
        assert run_job(job.id, worker_id="w1") == states.SUCCEEDED
    finally:
        reaper.stop()
        reaper.join(10)
    assert took["s"] >= 3 * ttl
    assert [e.message for e in events_of(job.id, "retry")] == []
    assert trainer_runs(job.id) == 1
    db.expire_all()
    assert db.get(Job, job.id).trained_at is not None
    assert_published(db, job.id)


KILL_WHILE_PUBLISHING = """
import os, signal, sys
from core.storage import LocalStorage
from worker.runner import run_job

real, moved = LocalStorage.adopt, []

def adopt(self, key, src, *, keep):
    out = real(self, key, src, keep=keep)
    moved.append(key)
    if len(moved) == 2:  # two files of final/ are in the store, the rest still in the work dir
        os.kill(os.getpid(), signal.SIGKILL)
    return out

LocalStorage.adopt = adopt
run_job(sys.argv[1], worker_id="w1")
"""


@SQLITE_ONLY
def test_a_worker_killed_while_publishing_is_not_trained_again(db: Session, worker_env: dict[str, str]) -> None:
    """A worker process SIGKILLed half-way through publishing: the job is reaped, and the next
    attempt finds the trained model (trained_at), publishes it and succeeds without a second
    trainer run."""
    job = make_job(db, worker_env["model"], steps=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", KILL_WHILE_PUBLISHING, job.id], env=env, cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-3000:]
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.status == states.RUNNING and job.lease_owner == "w1" and job.trained_at is not None
    assert trainer_runs(job.id) == 1

    # w1 is gone: its lease goes stale and the reaper puts the job back in the queue.
    db.execute(update(Job).where(Job.id == job.id).values(lease_heartbeat_at=time.time() - 3600))
    db.commit()
    with get_sessionmaker()() as other:
        assert reap_stale(other, get_settings().lease_ttl_s) == [job.id]
    db.execute(update(Job).where(Job.id == job.id).values(progress={}))  # skip the retry back-off
    db.commit()

    assert run_job(job.id, worker_id="w2") == states.SUCCEEDED
    assert trainer_runs(job.id) == 1
    assert any("earlier attempt" in e.message for e in events_of(job.id, "message"))
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.fine_tuned_model and job.trained_tokens and job.metrics.get("train_loss") is not None
    assert_published(db, job.id)
