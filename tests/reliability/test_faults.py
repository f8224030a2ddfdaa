"""Faults a shared GPU server sees, with real worker processes: no job is lost or run twice."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import states
from core.models import Checkpoint, Job
from core.queue import enqueue_job, producer
from tests.conftest import reset_caches
from tests.reliability.conftest import (
    IDLE_STEPS, STEADY_LEASE, assert_never_twice_at_once, events_of, job_status, make_job, resumed_steps, trainer_starts, wait_for,
)
from trainer.watchdog import alive

# Paced (IDLE_STEPS), the steps after the step-5 checkpoint last seconds, so the kill lands mid-run
# however fast the machine; few enough that the run and its resumed rest cost little CPU.
STEPS = 40


def training_job(db: Session, env: dict[str, str], steps: int = STEPS, **kw) -> Job:
    return make_job(db, env["model"], steps=steps, examples=64, checkpoint_every=5, log_every=5, **kw)


def wait_checkpoint(job_id: str, w, step: int = 5) -> None:
    wait_for(lambda: any(e.data.get("step", 0) >= step for e in events_of(job_id, "checkpoint")), 120,
             f"a checkpoint at step {step}\n{w.log()}")


def wait_trainer_checkpoint(job_id: str, env: dict[str, str], w, step: int = 5) -> None:
    """The step's checkpoint in the trainer's own event file: the database sees it only after the
    worker's pump has copied it, which on a busy machine can be near the end of the run."""
    from trainer.events import read_events

    path = Path(env["TUNEQ_HOME"]) / "work" / job_id / "events.jsonl"
    wait_for(lambda: path.exists() and any(e["type"] == "checkpoint" and e["data"].get("step", 0) >= step
                                           for e in read_events(path)), 120, f"a checkpoint at step {step}\n{w.log()}")


def wait_end(job_id: str, w, timeout: float = 180) -> str:
    wait_for(lambda: job_status(job_id) in states.TERMINAL, timeout, f"the job to end\n{w.log()}")
    return job_status(job_id)


def test_sigkill_of_the_worker_resumes_on_a_restarted_worker(db: Session, rel_env, workers) -> None:
    job = training_job(db, rel_env)
    w1 = workers(**IDLE_STEPS)
    enqueue_job(job.id)
    # The trainer's own event file, not the database: the pump's copy can lag to the end of a run.
    wait_trainer_checkpoint(job.id, rel_env, w1)
    trainer = wait_for(lambda: trainer_starts(job.id), 60, "the trainer's start event")[0].data["pid"]
    w1.kill()
    # The orphan stops by itself (its watchdog sees the worker gone), with no other worker on the
    # host to kill it: it must not go on holding the GPU, nor finish the job no one supervises.
    wait_for(lambda: not alive(trainer), 30, f"the orphaned trainer {trainer} to stop\n{w1.log()}")
    w2 = workers(**IDLE_STEPS)  # reaps the stale lease, stores what w1 announced but did not store, resumes
    assert wait_end(job.id, w2) == states.SUCCEEDED, w2.log()
    resumed = resumed_steps(job.id)
    assert resumed[0] is None and resumed[-1] is not None and resumed[-1] >= 5, resumed
    assert any(e.type == "retry" and "stopped heartbeating" in e.message for e in events_of(job.id))
    assert_never_twice_at_once(job.id)


def test_checkpoints_a_killed_worker_announced_but_had_not_stored_are_stored_and_resumed_from(
        db: Session, rel_env, workers) -> None:
    """A worker killed during its checkpoints' uploads: their rows are committed and their events
    read, so the next attempt on the host must find them by their rows, store them from its disk
    and resume from the newest, not drop them and start over."""
    job = training_job(db, rel_env)
    w1 = workers(**IDLE_STEPS)
    enqueue_job(job.id)
    wait_trainer_checkpoint(job.id, rel_env, w1)
    wait_for(lambda: db.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)
                                .execution_options(populate_existing=True)).first(), 60, f"a checkpoint's row\n{w1.log()}")
    trainer = wait_for(lambda: trainer_starts(job.id), 60, "the trainer's start event")[0].data["pid"]
    w1.kill()
    wait_for(lambda: not alive(trainer), 30, f"the orphaned trainer {trainer} to stop\n{w1.log()}")
    # As the worker leaves them when it dies before its uploads end (the store's copies, if any, are
    # overwritten by the next attempt's).
    db.execute(update(Checkpoint).where(Checkpoint.job_id == job.id).values(uploaded_at=None, storage_key=None))
    db.commit()
    w2 = workers(**IDLE_STEPS)
    assert wait_end(job.id, w2) == states.SUCCEEDED, w2.log()
    resumed = resumed_steps(job.id)
    assert resumed[0] is None and resumed[-1] is not None and resumed[-1] >= 5, (resumed, w2.log())
    assert_never_twice_at_once(job.id)


def test_sigkill_of_the_trainer_alone_is_retried_and_resumes(db: Session, rel_env, workers) -> None:
    job = training_job(db, rel_env)
    w = workers(**STEADY_LEASE, **IDLE_STEPS)  # the worker itself sees its trainer die: no lease expiry involved
    enqueue_job(job.id)
    wait_trainer_checkpoint(job.id, rel_env, w)
    os.kill(wait_for(lambda: trainer_starts(job.id), 60, "the trainer's start event")[0].data["pid"], signal.SIGKILL)
    assert wait_end(job.id, w) == states.SUCCEEDED, w.log()
    retry = [e for e in events_of(job.id, "retry")]
    assert len(retry) == 1 and "SIGKILL" in retry[0].message and retry[0].data["retry"] == 1
    assert resumed_steps(job.id)[-1] >= 5
    assert_never_twice_at_once(job.id)


def test_user_error_fails_at_once_without_retry(db: Session, rel_env, workers) -> None:
    job = make_job(db, rel_env["model"], training_text='{"messages": "not a list"}\nnot json\n')
    w = workers()
    enqueue_job(job.id)
    assert wait_end(job.id, w) == states.FAILED
    db.expire_all()
    failed = db.get(Job, job.id)
    assert failed.error["code"] == "data" and failed.error["message"]
    assert events_of(job.id, "retry") == [] and len(trainer_starts(job.id)) == 1


def test_same_message_twice_runs_once(db: Session, rel_env, workers) -> None:
    job = training_job(db, rel_env, steps=6)
    w1, w2 = workers(**STEADY_LEASE), workers(**STEADY_LEASE)
    enqueue_job(job.id)
    enqueue_job(job.id)
    assert wait_end(job.id, w1) == states.SUCCEEDED, w1.log() + w2.log()
    db.expire_all()
    assert db.get(Job, job.id).lease_attempt == 1 and len(trainer_starts(job.id)) == 1


def test_job_longer_than_the_visibility_timeout_runs_once(db: Session, rel_env, workers, monkeypatch) -> None:
    # Redis re-delivers an unacked message after the visibility timeout to a worker that
    # starts later, while the first run still goes on. The lease makes the second delivery drop out.
    # Paced steps: a trainer forked from the template could end its six steps before this test
    # stops it (seen on a loaded machine: the pid was gone).
    short = {"TUNEQ_VISIBILITY_TIMEOUT_S": "2", "TUNEQ_TEST_STEP_SLEEP_S": "1", **STEADY_LEASE}
    monkeypatch.setenv("TUNEQ_VISIBILITY_TIMEOUT_S", "2")
    reset_caches()
    job = training_job(db, rel_env, steps=6)
    # Both workers up before the job starts: on a busy machine a worker takes about a minute to
    # start, and the job must still run when its message comes back.
    w1, w2 = workers(**short), workers(**short)
    enqueue_job(job.id)
    trainer = wait_for(lambda: trainer_starts(job.id), 60, f"the trainer's start event\n{w1.log()}")[0].data["pid"]
    # The run goes on (its trainer held, its worker supervising and renewing the lease) until the
    # duplicate has been dropped, however slow the machine: a run of many steps instead was over
    # before the message came back when the pump's copy of its events lagged.
    os.kill(trainer, signal.SIGSTOP)
    try:
        def restored_and_dropped() -> bool:
            # What a consumer does when it (re)connects: messages unacked for longer than the
            # visibility timeout go back to the queue, though w1 still runs the job.
            with producer().connection_for_write() as conn:
                conn.default_channel.qos.restore_visible(num=100)
            return "dropping this duplicate delivery" in w1.log() + w2.log()

        wait_for(restored_and_dropped, 60, lambda: f"the re-delivered message\n{w1.log()}\n{w2.log()}", interval=0.5)
        assert job_status(job.id) == states.RUNNING
    finally:
        os.kill(trainer, signal.SIGCONT)
    assert wait_end(job.id, w1) == states.SUCCEEDED, w1.log() + w2.log()
    db.expire_all()
    assert db.get(Job, job.id).lease_attempt == 1 and len(trainer_starts(job.id)) == 1
