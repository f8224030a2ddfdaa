"""worker.runner.run_job called directly, with the real trainer on the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import states
from core.archive import INDEX_SUFFIX, Index
from core.jobs import acquire_lease, request_cancel
from core.models import Artifact, Checkpoint, Job
from core.settings import get_settings
from core.storage import get_storage
from tests.integration.conftest import (
    events_of, make_job, process_alive, trainer_pid, trainer_processes, wait_for,
)
from worker.gpus import get_pool
from worker.runner import run_job

LONG = 100_000  # steps: far more than a test waits for; these jobs end by cancel, pause or loss
# The database-specific part of these paths (the lease UPDATEs) is covered on both in test_db_lease.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


class Background:
    """run_job in a thread, as a Celery thread-pool slot runs it."""

    def __init__(self, job_id: str, worker_id: str = "w1"):
        self.result: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(job_id, worker_id), daemon=True)
        self.thread.start()

    def _run(self, job_id: str, worker_id: str) -> None:
        try:
            self.result = run_job(job_id, worker_id=worker_id)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join()
            self.error = exc

    def join(self, timeout: float = 120) -> str | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_job did not return"
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def running(db: Session, worker_env: dict[str, str]) -> Iterator[Job]:
    """A long job whose trainer is past its first steps: a metrics event every 2 steps, so the wait
    for the first one is 2 paced steps, not 20."""
    job = make_job(db, worker_env["model"], steps=LONG, examples=64, log_every=2)
    bg = Background(job.id)
    wait_for(lambda: events_of(job.id, "metrics"), 60, "the first metrics event")
    job.background = bg  # type: ignore[attr-defined]
    yield job
    if bg.thread.is_alive():  # a failed test must not leave a trainer behind
        with_session_cancel(db, job.id)
        bg.thread.join(60)


def with_session_cancel(db: Session, job_id: str) -> None:
    db.expire_all()
    job = db.get(Job, job_id)
    if job.status not in states.TERMINAL:
        request_cancel(db, job)
        db.commit()


def work_dir(job_id: str) -> Path:
    return get_settings().resolved_work_dir() / job_id


def test_job_runs_to_succeeded_with_events_checkpoints_and_artifacts(db: Session, worker_env: dict[str, str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Also on this one run (each a trainer fewer than a test of its own): a worker whose disk is
    nearly full takes no job and says so; and preparing a run (files and a continuation's
    checkpoint from the artifact store) happens before the supervise loop heartbeats, so a
    download longer than the lease must not get the job reaped: here preparation takes 3 s and
    the reaper's TTL is 2 s."""
    from core import workers
    from core.db import get_sessionmaker
    from core.jobs import reap_stale
    from tests.conftest import reset_caches
    from worker import runner
    from worker.host import HostThread

    job = make_job(db, worker_env["model"], steps=4, checkpoint_every=2, suffix="rev")

    monkeypatch.setenv("TUNEQ_MIN_FREE_DISK_GIB", "1000000")  # more than any disk here has free
    reset_caches()
    assert run_job(job.id, worker_id="w1") == "deferred"
    db.expire_all()
    assert db.get(Job, job.id).status == states.QUEUED
    HostThread(get_pool(get_settings()), "w1", slots=1).register()
    [entry] = [w for w in workers.registered() if w["worker_id"] == "w1"]
    assert entry["disk_full"] is True and entry["disk_free_gib"] > 0
    monkeypatch.setenv("TUNEQ_MIN_FREE_DISK_GIB", "0")
    reset_caches()

    real = runner.runnable_spec
    seen = {}

    def slow_fetch(session, j):  # noqa: ANN001, ANN202
        time.sleep(3.0)
        with get_sessionmaker()() as other:
            seen["reaped"] = reap_stale(other, 2.0)
            other.commit()
        return real(session, j)

    monkeypatch.setattr(runner, "runnable_spec", slow_fetch)
    assert run_job(job.id, worker_id="w1") == states.SUCCEEDED
    assert seen["reaped"] == []
    assert [e for e in events_of(job.id) if e.type == "retry"] == []

    db.expire_all()
    job = db.get(Job, job.id)
    assert job.status == states.SUCCEEDED and job.error is None and job.lease_owner is None
    assert job.host == get_pool(get_settings()).host  # the host it ran on, in its status body too
    from api.routes.jobs import job_out

    assert job_out(job).host == job.host
    assert job.fine_tuned_model == f"ft:tiny-llama:rev:{job.id}"
    assert job.trained_tokens and job.trained_tokens > 0
    assert job.progress["step"] == job.progress["total_steps"] == 4
    assert job.progress["tokens_per_second"] > 0 and "eta_seconds" in job.progress
    assert isinstance(job.metrics["train_loss"], float)

    types = [e.type for e in events_of(job.id)]
    assert types.count("metrics") == 4 and "start" in types and "finished" in types
    assert [(e.data["from"], e.data["to"]) for e in events_of(job.id, "status") if "from" in e.data][-2:] == [
        (states.QUEUED, states.RUNNING), (states.RUNNING, states.SUCCEEDED)]

    # Every checkpoint is whole in the store (the trainer's manifest with it), whatever host resumes.
    storage = get_storage()
    ckpts = db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)).all()
    assert [c.step for c in ckpts] == [2, 4] and all(c.uploaded_at for c in ckpts)
    for c in ckpts:
        stored = json.loads(storage.path(f"{c.storage_key}/manifest.json").read_bytes())["files"]
        assert {"optimizer.pt", "scheduler.pt", "rng.pt", "state.json", "adapter_model.safetensors"} <= set(stored)
        for name, want in stored.items():
            assert hashlib.sha256(storage.path(f"{c.storage_key}/{name}").read_bytes()).hexdigest() == want["sha256"]

    # The ended job left nothing on the worker's disk; its trainer log is in the store.
    assert not work_dir(job.id).exists()
    assert storage.exists(f"jobs/{job.id}/logs/trainer-attempt-1.log")

    arts = {a.name: a for a in db.scalars(select(Artifact).where(Artifact.job_id == job.id))}
    manifest = json.loads(storage.path(arts["final/manifest.json"].storage_key).read_bytes())
    assert {f"final/{rel}" for rel in manifest["files"]} | {
        "final/manifest.json", "adapter.tar.gz", "checkpoints/step-00000002.tar.gz",
        "checkpoints/step-00000004.tar.gz", "tensorboard.tar.gz"} == set(arts)
    assert arts["tensorboard.tar.gz"].kind == "logs"
    assert arts["checkpoints/step-00000002.tar.gz"].kind == "checkpoint"
    assert arts["final/manifest.json"].kind == "manifest"
    assert arts["final/adapter_model.safetensors"].kind == "file"
    assert arts["adapter.tar.gz"].kind == "archive"
    for a in arts.values():
        assert a.storage_key.startswith(f"jobs/{job.id}/")
        content = archive_bytes(storage, a.storage_key) if a.storage_key.endswith(INDEX_SUFFIX) \
            else storage.path(a.storage_key).read_bytes()
        assert hashlib.sha256(content).hexdigest() == a.sha256 and len(content) == a.bytes > 0
    with tarfile.open(fileobj=io.BytesIO(archive_bytes(storage, arts["adapter.tar.gz"].storage_key)), mode="r:gz") as tar:
        weights = tar.extractfile("adapter/adapter_model.safetensors").read()
    assert hashlib.sha256(weights).hexdigest() == manifest["files"]["adapter_model.safetensors"]["sha256"]


def archive_bytes(storage, index_key: str) -> bytes:  # noqa: ANN001
    """What the API streams for an archive artifact."""
    return b"".join(Index.from_json(storage.path(index_key).read_bytes()).stream(storage.iter_bytes))


@SQLITE_ONLY
def test_bad_training_data_fails_with_the_trainers_error(db: Session, worker_env: dict[str, str]) -> None:
    job = make_job(db, worker_env["model"], training_text='{"messages": "not a list"}\nnot json\n')
    assert run_job(job.id, worker_id="w1") == states.FAILED
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.status == states.FAILED
    assert set(job.error) == {"code", "message", "param"}
    assert job.error["code"] == "data" and job.error["message"]


@SQLITE_ONLY
@pytest.mark.parametrize("gone", ["deleted", "bytes_missing"])
def test_a_job_whose_file_is_gone_fails_once_naming_the_file(db: Session, worker_env: dict[str, str], gone: str) -> None:
    """A file deleted under a queued job (or its bytes lost) fails the job at once, as the user's
    error: not an attempt that crashes, is re-queued by the reaper and ends as `infrastructure`."""
    from core.identity import DELETED
    from core.models import File

    job = make_job(db, worker_env["model"])
    f = db.get(File, job.training_file)
    get_storage().delete(f.storage_key)
    if gone == "deleted":
        f.status = DELETED
    db.commit()
    assert run_job(job.id, worker_id="w1") == states.FAILED
    db.expire_all()
    job = db.get(Job, job.id)
    assert job.status == states.FAILED and job.lease_owner is None
    assert job.error["code"] == "file_not_found" and job.error["param"] == "training_file", job.error
    assert f.id in job.error["message"]
    assert not [e for e in events_of(job.id) if "Trainer started" in e.message]


def test_second_delivery_of_a_running_job_drops_out_and_cancel_stops_the_trainer(running: Job, db: Session) -> None:
    # A second delivery leaves the running job alone, so the same trainer then serves the cancel.
    assert run_job(running.id, worker_id="w2") == "skipped"
    db.expire_all()
    assert db.get(Job, running.id).lease_owner == "w1"
    assert len([e for e in events_of(running.id, "message") if e.data and "pid" in e.data]) == 1

    pid = trainer_pid(running.id)
    assert process_alive(pid)
    db.expire_all()
    request_cancel(db, db.get(Job, running.id))
    db.commit()
    t0 = time.monotonic()
    assert running.background.join() == states.CANCELLED
    stop_s = time.monotonic() - t0
    db.expire_all()
    assert db.get(Job, running.id).status == states.CANCELLED
    assert not process_alive(pid) and trainer_processes(work_dir(running.id)) == []
    assert stop_s < 15, f"cancel took {stop_s:.1f}s"


@SQLITE_ONLY
def test_pause_saves_a_checkpoint_and_frees_the_slot(running: Job, db: Session) -> None:
    pid = trainer_pid(running.id)
    db.execute(update(Job).where(Job.id == running.id).values(pause_requested=True))
    db.commit()
    assert running.background.join() == states.PAUSED
    db.expire_all()
    job = db.get(Job, running.id)
    assert job.status == states.PAUSED and not job.pause_requested and job.lease_owner is None
    assert db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()
    assert not process_alive(pid)


@SQLITE_ONLY
def test_a_resume_after_the_trainer_was_told_to_pause_requeues_the_job(
        running: Job, db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume lands after the worker signalled the trainer but before it wrote `paused`: the
    resume answered that the pause was withdrawn, so the job must go on, not stay paused."""
    from core.control import request_resume
    from core.db import session_scope
    from worker import runner

    answered = []
    original = runner.JobRun.finish

    def finish_after_a_resume(self, target, message, **kw):  # noqa: ANN001, ANN003
        if target == states.PAUSED:
            with session_scope() as other:
                answered.append(request_resume(other, other.get(Job, self.job_id)).status)
        return original(self, target, message, **kw)

    monkeypatch.setattr(runner.JobRun, "finish", finish_after_a_resume)
    db.execute(update(Job).where(Job.id == running.id).values(pause_requested=True))
    db.commit()
    assert running.background.join() == states.QUEUED
    assert answered == [states.RUNNING]  # the resume's own answer: still running, pause withdrawn
    db.expire_all()
    job = db.get(Job, running.id)
    assert job.status == states.QUEUED and not job.pause_requested and job.lease_owner is None
    assert [e.data["to"] for e in events_of(job.id, "status") if e.data and e.data.get("to")][-2:] == [
        states.PAUSED, states.QUEUED]
    db.execute(update(Job).where(Job.id == running.id).values(status=states.CANCELLED))
    db.commit()


@SQLITE_ONLY
def test_lost_lease_kills_the_trainer_and_leaves_the_job_alone(running: Job, db: Session) -> None:
    pid = trainer_pid(running.id)
    # Another worker took the job over (as after a reap): the old run must stop writing.
    db.execute(update(Job).where(Job.id == running.id).values(lease_owner="thief", lease_attempt=Job.lease_attempt + 1))
    db.commit()
    assert running.background.join() == "lost"
    db.expire_all()
    job = db.get(Job, running.id)
    assert job.status == states.RUNNING and job.lease_owner == "thief"
    assert not process_alive(pid)
    db.execute(update(Job).where(Job.id == running.id).values(status=states.FAILED, lease_owner=None))
    db.commit()


@SQLITE_ONLY
def test_rerun_after_a_lost_worker_resumes_from_the_checkpoint(db: Session, worker_env: dict[str, str]) -> None:
    job = make_job(db, worker_env["model"], steps=LONG, examples=64, checkpoint_every=5, log_every=20)
    first = Background(job.id, "w1")
    wait_for(lambda: events_of(job.id, "checkpoint"), 60, "a checkpoint")
    # w1 stops heartbeating as far as the DB can tell: its lease is taken by w2.
    db.execute(update(Job).where(Job.id == job.id).values(lease_heartbeat_at=time.time() - 3600))
    db.commit()
    assert acquire_lease(db, job.id, "w2", ttl_s=30) is not None
    assert first.join() == "lost"
    db.execute(update(Job).where(Job.id == job.id).values(status=states.QUEUED, lease_owner=None))
    db.commit()

    second = Background(job.id, "w3")
    start = wait_for(lambda: [e for e in events_of(job.id, "start")][1:], 60, "the second start event")[0]
    assert start.data["resumed_from_step"] >= 5
    with_session_cancel(db, job.id)
    assert second.join() == states.CANCELLED


@SQLITE_ONLY
def test_a_worker_handed_its_running_job_again_stops_the_first_trainer_before_the_second(
        db: Session, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A reaper re-queued the job of a live run and the same worker leased it again (attempt 2):
    attempt 1 stops its trainer before attempt 2 starts one, so the job never trains twice at once
    in its work directory."""
    from worker import gpus

    monkeypatch.setattr(gpus, "_pool", gpus.GpuPool.for_host(get_settings(), slots=2))  # room for both
    job = make_job(db, worker_env["model"], steps=LONG, examples=64, checkpoint_every=5, log_every=20)
    first = Background(job.id, "w1")
    wait_for(lambda: events_of(job.id, "checkpoint"), 60, "a checkpoint")
    pid = trainer_pid(job.id)
    # As a reaper does: back to the queue, no owner, no back-off left to wait.
    db.execute(update(Job).where(Job.id == job.id).values(status=states.QUEUED, lease_owner=None, progress={}))
    db.commit()
    second = Background(job.id, "w1")
    start = wait_for(lambda: [e for e in events_of(job.id, "start")][1:], 60, "the second start event")[0]
    assert first.join() == "lost"
    assert not process_alive(pid)
    db.expire_all()
    starts = [e for e in events_of(job.id, "message") if e.data and "pid" in e.data]
    assert [e.data["attempt"] for e in starts] == [1, 2]
    # Attempt 1's trainer was gone before attempt 2's started: no step of it after that start.
    assert all(e.seq < starts[1].seq or e.data["step"] > start.data["resumed_from_step"]
               for e in events_of(job.id, "metrics")), "two trainers of the job ran at once"
    with_session_cancel(db, job.id)
    assert second.join() == states.CANCELLED


@SQLITE_ONLY
def test_the_sweep_removes_work_dirs_of_ended_jobs_and_of_jobs_gone_to_another_host(
        db: Session, worker_env: dict[str, str]) -> None:
    from worker.disk import sweep_work_dirs

    def job_with_dir(status: str, host: str | None) -> str:
        job = make_job(db, worker_env["model"], steps=2)
        db.execute(update(Job).where(Job.id == job.id).values(status=status, host=host))
        db.commit()
        (work_dir(job.id) / "checkpoints").mkdir(parents=True)
        return job.id

    ended = job_with_dir(states.SUCCEEDED, "here")
    moved = job_with_dir(states.RUNNING, "there")  # a paused job resumed on another host
    paused_here = job_with_dir(states.PAUSED, "here")
    in_use = job_with_dir(states.CANCELLED, "here")  # its GPUs are still held here: being set up
    unknown = "ftjob-deleted"
    (work_dir(unknown)).mkdir(parents=True)
    removed = sweep_work_dirs(db, get_settings(), "here", busy={in_use})
    assert sorted(removed) == sorted([ended, moved, unknown])
    assert work_dir(paused_here).is_dir() and work_dir(in_use).is_dir()
    assert not work_dir(ended).exists() and not work_dir(moved).exists()
