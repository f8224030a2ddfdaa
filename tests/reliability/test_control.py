"""GPU allocation, pause/resume, priorities and preemption with configured GPU counts on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core import states
from core.control import request_pause, request_resume
from core.jobs import JobError, check_gpus_fit, request_cancel
from core.models import Job
from core.queue import enqueue_job
from core.scheduling import queue_position
from tests.reliability.conftest import (
    IDLE_STEPS, STEADY_LEASE, assert_never_twice_at_once, events_of, job_status, make_job, resumed_steps, trainer_starts, wait_for,
)

LONG = 100_000
# These tests are about control, not lease expiry (seen with the 4 s lease: both jobs retried, the
# high-priority job then found a free GPU). The worker-kill tests keep the short lease.
CONTROL = {**STEADY_LEASE, **IDLE_STEPS}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


def devices_of(started: dict) -> str:
    """The CUDA_VISIBLE_DEVICES a trainer runs with, from its "Trainer started" event's data. A
    trainer forked from the template (worker.template) set it after the fork, which its
    /proc/PID/environ (the template's, from its start) does not show: the worker handed it the
    event's devices."""
    if started.get("forked"):
        return ",".join(str(d) for d in started["devices"])
    return environ_of(started["pid"])["CUDA_VISIBLE_DEVICES"]


def story(**jobs: str) -> str:
    """Each job's events in order (type, step or status change, message): what a failure needs."""
    lines = []
    for name, job_id in jobs.items():
        lines.append(f"--- {name} {job_id} ({job_status(job_id)})")
        for e in events_of(job_id):
            if e.type != "metrics":
                lines.append(f"  {e.seq} {e.type} {e.message} {e.data if e.type == 'status' else ''}")
    return "\n".join(lines) + "\n"


def status_is(job_id: str, *wanted: str):
    return lambda: job_status(job_id) in wanted


def test_two_gpus_run_two_one_gpu_jobs_at_once_each_on_its_own_gpu(db: Session, rel_env, workers) -> None:
    # One job more than GPUs: each running job has a GPU of its own, the last one waits for one.
    # Two GPUs show that as well as four did, for two trainer processes fewer.
    jobs = [make_job(db, rel_env["model"], steps=LONG, examples=32, log_every=50) for _ in range(3)]
    w = workers(gpus=2, **CONTROL)
    for j in jobs:
        enqueue_job(j.id)
    wait_for(lambda: sum(job_status(j.id) == states.RUNNING for j in jobs) == 2
             and all(trainer_starts(j.id) for j in jobs if job_status(j.id) == states.RUNNING), 120,
             f"two running jobs\n{w.log()}")
    running = [j for j in jobs if job_status(j.id) == states.RUNNING]
    waiting = [j for j in jobs if j not in running]
    devices = sorted(devices_of(trainer_starts(j.id)[0].data) for j in running)
    assert devices == ["0", "1"]
    assert len(waiting) == 1 and job_status(waiting[0].id) == states.QUEUED
    db.expire_all()
    assert queue_position(db, db.get(Job, waiting[0].id)) == 1
    # Free one GPU: the waiting job gets it without anyone sending it again.
    request_cancel(db, db.get(Job, running[0].id))
    db.commit()
    wait_for(status_is(waiting[0].id, states.RUNNING), 60, f"the fifth job to start\n{w.log()}")
    for j in jobs:
        db.expire_all()
        if job_status(j.id) not in states.TERMINAL:
            request_cancel(db, db.get(Job, j.id))
            db.commit()
    wait_for(lambda: all(job_status(j.id) == states.CANCELLED for j in jobs), 60, "all cancelled")


def test_a_job_bigger_than_every_registered_host_is_refused(rel_env, workers) -> None:
    from core.workers import registered

    assert registered() == []
    check_gpus_fit(8)  # nothing registered yet: a host may still join
    workers(gpus=2, **CONTROL)
    wait_for(lambda: _raises(lambda: check_gpus_fit(3)), 10, "the worker's registration")
    with pytest.raises(JobError) as err:
        check_gpus_fit(3)
    assert err.value.param == "gpus" and "2" in str(err.value)
    check_gpus_fit(2)


def _raises(fn) -> bool:
    try:
        fn()
    except JobError:
        return True
    return False


def test_pause_resume_and_cancel_while_queued_running_or_paused(db: Session, rel_env, workers) -> None:
    job = make_job(db, rel_env["model"], steps=LONG, examples=64, log_every=5)
    queued = make_job(db, rel_env["model"], steps=LONG)
    # paused and cancelled before any worker ran them
    request_pause(db, db.get(Job, queued.id))
    db.commit()
    assert job_status(queued.id) == states.PAUSED
    request_cancel(db, db.get(Job, queued.id))
    db.commit()
    assert job_status(queued.id) == states.CANCELLED

    w = workers(**CONTROL)
    enqueue_job(job.id)
    wait_for(lambda: events_of(job.id, "metrics"), 120, w.log())
    db.expire_all()
    request_pause(db, db.get(Job, job.id))
    db.commit()
    wait_for(status_is(job.id, states.PAUSED), 60, f"paused\n{w.log()}")
    ckpts = events_of(job.id, "checkpoint")  # saved on pause: the job has no checkpoint period
    assert len(ckpts) == 1
    db.expire_all()
    assert db.get(Job, job.id).lease_owner is None
    request_resume(db, db.get(Job, job.id))
    db.commit()
    enqueue_job(job.id)
    wait_for(lambda: len(events_of(job.id, "start")) == 2, 120, f"the resumed run\n{w.log()}")
    assert resumed_steps(job.id)[-1] == ckpts[0].data["step"]
    # pause again, then cancel the paused job
    second = events_of(job.id, "start")[-1].seq
    wait_for(lambda: any(e.seq > second for e in events_of(job.id, "metrics")), 60, "the resumed run to train")
    db.expire_all()
    request_pause(db, db.get(Job, job.id))
    db.commit()
    wait_for(status_is(job.id, states.PAUSED), 60, f"paused again\n{w.log()}")
    db.expire_all()
    request_cancel(db, db.get(Job, job.id))
    db.commit()
    assert job_status(job.id) == states.CANCELLED
    assert_never_twice_at_once(job.id)


def test_higher_priority_preempts_the_lowest_and_the_paused_one_resumes(db: Session, rel_env, workers) -> None:
    low = make_job(db, rel_env["model"], steps=LONG, examples=64, log_every=5)
    lower = make_job(db, rel_env["model"], steps=LONG, examples=64, log_every=5)
    db.execute(update(Job).where(Job.id == lower.id).values(priority=-5))
    db.commit()
    w = workers(gpus=2, **CONTROL)
    enqueue_job(low.id)
    enqueue_job(lower.id)
    wait_for(lambda: all(events_of(j.id, "metrics") for j in (low, lower)), 120, f"both running\n{w.log()}")

    high = make_job(db, rel_env["model"], steps=6, examples=32, log_every=2)
    db.execute(update(Job).where(Job.id == high.id).values(priority=10))
    db.commit()
    enqueue_job(high.id)
    wait_for(status_is(high.id, states.SUCCEEDED, states.FAILED), 120, f"the high-priority job\n{w.log()}")
    assert job_status(high.id) == states.SUCCEEDED
    preempted = events_of(lower.id, "preempted")
    assert len(preempted) == 1 and high.id in preempted[0].message, (
        "the lowest priority job is the one paused\n" + story(low=low.id, lower=lower.id, high=high.id) + w.log())
    assert events_of(low.id, "preempted") == [] and len(trainer_starts(low.id)) == 1
    # The paused one resumes from its checkpoint once the GPU is free again.
    wait_for(lambda: len(events_of(lower.id, "start")) == 2, 120, f"the preempted job to resume\n{w.log()}")
    ckpt = events_of(lower.id, "checkpoint")[0].data["step"]
    assert resumed_steps(lower.id)[-1] == ckpt
    transitions = [(e.data["from"], e.data["to"]) for e in events_of(lower.id, "status") if e.data and "from" in e.data]
    assert transitions[-3:] == [(states.RUNNING, states.PAUSED), (states.PAUSED, states.QUEUED),
                                (states.QUEUED, states.RUNNING)]
    # The high job started after the lower one paused and before it came back.
    seq = {e.data["to"]: e.seq for e in events_of(lower.id, "status") if e.data and "to" in e.data}
    assert seq[states.PAUSED] < trainer_starts(high.id)[0].seq < trainer_starts(lower.id)[-1].seq
    for j in (low, lower):
        db.expire_all()
        request_cancel(db, db.get(Job, j.id))
        db.commit()
    wait_for(lambda: all(job_status(j.id) == states.CANCELLED for j in (low, lower)), 60, "cancelled")
    assert_never_twice_at_once(lower.id)
