"""A job on two devices through the worker: two trainer processes under `accelerate launch`.

The host declares two GPUs (TUNEQ_GPUS=2) and has none, so the ranks run on the CPU with gloo:
the same launch command, process supervision, rank-0-only events and artifacts, and rank
failures as on a GPU server.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import states
from core.control import request_resume
from core.models import Artifact, Checkpoint, Job
from core.settings import get_settings
from core.storage import get_storage
from tests.conftest import reset_caches
from tests.integration.conftest import events_of, make_job, trainer_processes, wait_for
from tests.integration.test_worker_runner import Background, with_session_cancel
from trainer.events import read_events
from worker.runner import run_job
from worker.workdir import runnable_spec

LONG = 100_000
# The database's part (leases) is covered on both in test_db_lease; here one is enough.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def two_devices(worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    # The production launch path (accelerate launch), on a host that declares two GPUs.
    monkeypatch.setenv("TUNEQ_ACCELERATE_LAUNCH", "true")
    monkeypatch.setenv("TUNEQ_GPUS", "2")
    monkeypatch.setenv("TUNEQ_DIST_TIMEOUT_S", "60")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    reset_caches()
    return worker_env


def two_gpu_job(db: Session, model: str, **kw) -> Job:
    job = make_job(db, model, **kw)
    db.execute(update(Job).where(Job.id == job.id).values(gpus=2))
    db.commit()
    return job


def work_dir(job_id: str) -> Path:
    return get_settings().resolved_work_dir() / job_id


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_two_process_job_runs_once_with_one_set_of_events_and_artifacts(db: Session, two_devices: dict[str, str]) -> None:
    hp = {"max_steps": 8, "batch_size": 2, "max_seq_len": 32, "warmup_steps": 0, "learning_rate": 3e-3}
    job = two_gpu_job(db, two_devices["model"], examples=32, checkpoint_every=4, hyperparameters=hp)
    assert run_job(job.id, worker_id="w1") == states.SUCCEEDED

    started = [e for e in events_of(job.id, "message") if e.data and "pid" in e.data]
    assert len(started) == 1 and started[0].data["devices"] == [0, 1]
    # The job ended, so its work directory is gone: its checkpoints are in the store now.
    assert not work_dir(job.id).exists()
    stored = {c.step: c for c in db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id))}
    assert stored[8].uploaded_at is not None, stored
    # Both ranks ran: the checkpoint holds the RNG state of each.
    import torch

    rng = get_storage().local_path(f"{stored[8].storage_key}/rng.pt")
    assert len(torch.load(rng, weights_only=True)) == 2

    # Events written once, by rank 0 only.
    lines = [{"type": e.type, "data": e.data} for e in events_of(job.id) if e.type in ("start", "finished", "metrics")]
    kinds = [e["type"] for e in lines]
    assert kinds.count("start") == 1 and kinds.count("finished") == 1 and kinds.count("metrics") == 8
    assert [e["data"]["step"] for e in lines if e["type"] == "metrics"] == list(range(1, 9))

    # One set of artifacts.
    names = [a.name for a in db.scalars(select(Artifact).where(Artifact.job_id == job.id))]
    assert len(names) == len(set(names)) and names.count("adapter.tar.gz") == 1
    assert "final/adapter_model.safetensors" in names

    # Two ranks at batch 2 take the same steps as one process at batch 4: that process's numbers
    # are all the comparison needs, so it trains here (trainer.job), on one thread like each rank.
    from trainer.job import run_job as train
    from trainer.spec import JobSpec

    db.expire_all()
    spec = runnable_spec(db, db.get(Job, job.id))
    spec["hyperparameters"]["batch_size"] = 4
    single = work_dir(job.id).parent / "single"
    single.mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(JobSpec.model_validate(spec), single) == 0, read_events(single / "events.jsonl")[-3:]
    finally:
        torch.set_num_threads(threads)
    two = [e["data"]["train_loss"] for e in lines if e["type"] == "metrics"]
    one = [e["data"]["train_loss"] for e in read_events(single / "events.jsonl") if e["type"] == "metrics"]
    assert two == pytest.approx(one, rel=1e-4)
    assert all(math.isfinite(x) for x in two) and sum(two[-3:]) < sum(two[:3])


def test_pause_resume_across_ranks_then_a_dead_rank_ends_the_run_with_a_retry(
    db: Session, two_devices: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = two_gpu_job(db, two_devices["model"], steps=LONG, examples=64, log_every=5)
    out = work_dir(job.id)
    first = Background(job.id)
    wait_for(lambda: events_of(job.id, "metrics"), 90, "the first metrics event")
    ranks = {rank_of(p) for p in trainer_processes(out)}
    assert {0, 1} <= ranks, f"two ranks should run, found {ranks}"

    # Pause: SIGUSR1 must reach both ranks (each in a session of its own under torchrun).
    db.execute(update(Job).where(Job.id == job.id).values(pause_requested=True))
    db.commit()
    assert first.join(90) == states.PAUSED
    assert trainer_processes(out) == []
    saved = events_of(job.id, "checkpoint")[-1].data["step"]

    db.expire_all()
    request_resume(db, db.get(Job, job.id))
    db.commit()
    second = Background(job.id)
    start = wait_for(lambda: events_of(job.id, "start")[1:] or (not second.thread.is_alive() and [second.result]), 90,
                     "the resumed start")[0]
    assert not isinstance(start, str), (start, [e.message for e in events_of(job.id)][-6:],
                                        (out / "trainer.log").read_text()[-3000:])
    assert start.data["resumed_from_step"] == saved
    wait_for(lambda: [e for e in events_of(job.id, "metrics") if e.seq > start.seq], 60, "training after the resume")

    # A rank dies: torchrun stops the other, the worker sees the run end and re-queues the job.
    victim = next(p for p in trainer_processes(out) if rank_of(p) == 1)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        outcome = second.join(90)
    finally:
        if second.thread.is_alive():
            with_session_cancel(db, job.id)
    took = time.monotonic() - killed_at
    assert outcome == states.QUEUED, outcome
    assert took < 60, f"the job took {took:.0f}s to notice the dead rank"
    assert trainer_processes(out) == []
    retry = events_of(job.id, "retry")
    assert len(retry) == 1, [e.message for e in events_of(job.id)][-5:]
    db.expire_all()
    assert db.get(Job, job.id).status == states.QUEUED
    db.execute(update(Job).where(Job.id == job.id).values(status=states.CANCELLED))
    db.commit()
