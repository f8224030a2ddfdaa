"""Two hosts on this machine: two workers with their own TUNEQ_HOST_ID, work folder and GPU locks,
sharing one S3 store (moto's server), PostgreSQL and Redis. Whatever happens to host A, host B
carries on its jobs from the checkpoints in the store."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import control, states
from core.models import Artifact, Checkpoint, Job
from core.queue import enqueue_job
from core.storage import get_storage
from tests.conftest import reset_caches
from tests.reliability.conftest import events_of, job_status, make_job, trainer_starts, wait_for
from tests.s3server import bucket_keys, s3_env
from trainer.signals import PAUSE_FILE

STEPS = 40  # past the kill test's freeze (two periods and two steps) and the paused test's two kept checkpoints
PERIOD = 10  # checkpoint_every_steps
# CPU float math, same seed, same data order, restored RNG and optimizer: the resumed run
# computes the same numbers; the tolerance only absorbs reduction-order noise.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-6


@pytest.fixture
def s3(rel_env: dict[str, str], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One bucket for both hosts (and this process, which stores the training files)."""
    from core.storage import get_storage as storage_now

    env = s3_env(s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_caches()
    storage_now().ensure_bucket()  # type: ignore[attr-defined]
    return env


def host(workers, tmp_path: Path, s3: dict[str, str], name: str, **extra: str):  # noqa: ANN001, ANN201
    root = tmp_path / name
    return workers(TUNEQ_HOST_ID=name, TUNEQ_WORK_DIR=str(root / "work"), TUNEQ_GPU_LOCK_DIR=str(root / "locks"),
                   TUNEQ_STORAGE_CACHE_DIR=str(root / "cache"), **s3, **extra)


def training_job(db: Session, env: dict[str, str], keep: int = 2, **extra: Any) -> Job:
    return make_job(db, env["model"], steps=STEPS, examples=64,
                    schedule={"log_every_steps": 1, "checkpoint_every_steps": PERIOD, "keep_checkpoints": keep},
                    **extra)


def losses(job_id: str) -> dict[int, float]:
    """train_loss by step; a step computed twice (after a resume) counts as its last run."""
    return {e.data["step"]: e.data["train_loss"] for e in events_of(job_id, "metrics")}


def stored_checkpoints(db: Session, job_id: str) -> list[Checkpoint]:
    db.expire_all()
    return list(db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def adapter(db: Session, job_id: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    key = db.scalar(select(Artifact.storage_key).where(Artifact.job_id == job_id,
                                                       Artifact.name == "final/adapter_model.safetensors"))
    assert key, f"{job_id} has no stored adapter"
    return load_file(str(get_storage().local_path(key)))


def last_step(events: Path) -> int:
    """The newest metrics step in a trainer's events.jsonl (0 before the first)."""
    try:
        text = events.read_text()
    except FileNotFoundError:
        return 0
    whole = text.split("\n")[:-1]  # a line without its newline is still being written
    return max((json.loads(line)["data"]["step"] for line in whole if '"metrics"' in line), default=0)


def freeze_past(job_id: str, events: Path, step: int) -> int:
    """SIGSTOP the job's trainer as soon as its own events file shows a step past `step`; its pid.

    The trainer on a tiny model runs far ahead of the worker's view in the database, so the test
    watches the file the trainer writes, and freezes it long before its last step: whatever the
    machine's speed, the trainer is stopped mid-run, not already gone.
    """
    pid = wait_for(lambda: trainer_starts(job_id), 180, "the trainer's start")[0].data["pid"]
    wait_for(lambda: last_step(events) > step, 180, f"step {step + 1} in {events}", interval=0.01)
    os.kill(pid, signal.SIGSTOP)
    assert last_step(events) < STEPS, "the trainer ran to its end before it could be stopped"
    return pid


def wait_end(job_id: str, w, timeout: float = 300) -> str:  # noqa: ANN001
    wait_for(lambda: job_status(job_id) in states.TERMINAL, timeout, lambda: f"{job_id} to end\n{w.log()}")
    return job_status(job_id)


def test_host_a_killed_mid_run_host_b_resumes_from_the_store_and_matches_an_uninterrupted_run(
        db: Session, rel_env, workers, s3, tmp_path: Path) -> None:
    job = training_job(db, rel_env, keep=50)  # keep all: A's checkpoints stay to be continued from
    a = host(workers, tmp_path, s3, "host-a")
    enqueue_job(job.id)
    a_events = tmp_path / "host-a" / "work" / job.id / "events.jsonl"
    # Freeze the trainer past its second checkpoint, let the worker store what it wrote, then kill
    # both at once: the kill lands mid-run, between checkpoints, with nothing announced that is
    # not in the store.
    trainer = freeze_past(job.id, a_events, 2 * PERIOD + 2)
    a_last = last_step(a_events)
    # The worker's event pump has read the trainer's last lines, its checkpoints among them.
    wait_for(lambda: max((e.data["step"] for e in events_of(job.id, "metrics")), default=0) == a_last, 120,
             lambda: f"step {a_last} in the database\n{a.log()}")
    wait_for(lambda: [c for c in stored_checkpoints(db, job.id) if c.uploaded_at and c.step >= 2 * PERIOD], 120,
             lambda: f"a stored checkpoint at step {2 * PERIOD}\n{a.log()}")
    wait_for(lambda: all(c.uploaded_at for c in stored_checkpoints(db, job.id)), 60, "the uploads to finish")
    a.kill()
    os.kill(trainer, signal.SIGKILL)
    newest = max(c.step for c in stored_checkpoints(db, job.id) if c.uploaded_at)
    assert newest < a_last < STEPS, (newest, a_last)  # killed mid-run, past its newest checkpoint
    assert {c.host for c in stored_checkpoints(db, job.id)} == {"host-a"}

    b = host(workers, tmp_path, s3, "host-b")  # reaps A's lease, fetches the checkpoint from the store
    assert wait_end(job.id, b) == states.SUCCEEDED, b.log()
    runs = trainer_starts(job.id)
    assert [r.data["host"] for r in runs] == ["host-a", "host-b"]
    resumed = [e.data.get("resumed_from_step") for e in events_of(job.id, "start")]
    assert resumed == [None, newest], resumed
    assert a_last - newest <= PERIOD, "recomputed more than one checkpoint period"
    assert "fetching step-" in b.log_path.read_text(), "B must have downloaded the checkpoint, not found it"
    # The worker removes the folder just after it commits the end state: wait for it, briefly.
    wait_for(lambda: not (tmp_path / "host-b" / "work" / job.id).exists(), 30,
             lambda: f"the ended job's files on host B to be removed\n{b.log()}")

    # The same job without interruption, on B, gives the same losses and weights.
    reference = training_job(db, rel_env, keep=50)
    enqueue_job(reference.id)
    assert wait_end(reference.id, b) == states.SUCCEEDED, b.log()
    got, want = losses(job.id), losses(reference.id)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), f"step {step}: {got[step]} != {want[step]}"
    wa, wb = adapter(db, job.id), adapter(db, reference.id)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= WEIGHT_ATOL, name

    # A job continued from a checkpoint written on A runs on B (A is gone).
    on_a = next(c for c in stored_checkpoints(db, job.id) if c.host == "host-a" and c.step == PERIOD)
    cont = make_job(db, rel_env["model"], steps=5, examples=16, init_from=on_a.id)
    enqueue_job(cont.id)
    assert wait_end(cont.id, b) == states.SUCCEEDED, b.log()
    assert [r.data["host"] for r in trainer_starts(cont.id)] == ["host-b"]


def test_a_job_paused_on_host_a_finishes_on_host_b(db: Session, rel_env, workers, s3, tmp_path: Path) -> None:
    job = training_job(db, rel_env)
    a = host(workers, tmp_path, s3, "host-a")
    enqueue_job(job.id)
    work = tmp_path / "host-a" / "work" / job.id
    # The trainer is held mid-run until the worker has asked it to pause: the pause is what ends
    # it, not its last step.
    trainer = freeze_past(job.id, work / "events.jsonl", 4)
    control.request_pause(db, db.get(Job, job.id))
    db.commit()
    wait_for(lambda: (work / PAUSE_FILE).exists(), 60, lambda: f"the worker to ask for the pause\n{a.log()}")
    os.kill(trainer, signal.SIGCONT)
    wait_for(lambda: job_status(job.id) == states.PAUSED, 120,
             lambda: f"the pause (the job is {job_status(job.id)})\n{a.log()}")
    paused_at = max(c.step for c in stored_checkpoints(db, job.id))
    assert all(c.uploaded_at for c in stored_checkpoints(db, job.id)), "paused before its checkpoint was stored"
    a.kill()  # host A is gone (its local copy with it)

    b = host(workers, tmp_path, s3, "host-b")
    control.request_resume(db, db.get(Job, job.id))
    db.commit()
    enqueue_job(job.id)
    assert wait_end(job.id, b) == states.SUCCEEDED, b.log()
    assert [r.data["host"] for r in trainer_starts(job.id)] == ["host-a", "host-b"]
    assert [e.data.get("resumed_from_step") for e in events_of(job.id, "start")] == [None, paused_at]
    # Rotation reached the store: only keep_checkpoints (2) are listed, and each one exists there.
    kept = stored_checkpoints(db, job.id)
    assert [c.step for c in kept] == [STEPS - PERIOD, STEPS]
    folders = {m.group(1) for k in bucket_keys(s3["TUNEQ_S3_ENDPOINT_URL"], s3["TUNEQ_STORAGE_URL"])
               if (m := re.search(rf"jobs/{job.id}/checkpoints/(step-\d+)/", k))}
    assert folders == {c.storage_key.rsplit("/", 1)[-1] for c in kept}
