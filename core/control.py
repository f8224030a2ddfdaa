"""Pause, resume and preemption: flags in the database that the worker holding the job obeys.

A user's pause keeps the job paused until resumed. A preemption is a pause that a
higher-priority job asked for: the job goes back to the queue at once (marked in its
`preempted_by` column, shown as progress["preempted_by"]) and resumes from its checkpoint when
GPUs are free again.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from core import limits, states
from core.models import Job

def request_pause(db: Session, job: Job) -> Job:
    """Pause a queued job now, or flag a running one for its worker. The caller commits."""
    for _ in range(5):
        observed = job.status
        if observed == states.PAUSED:
            return job
        if observed not in (states.QUEUED, states.RUNNING):
            raise states.IllegalTransition(job.id, observed, states.PAUSED)
        # Conditioned on the status seen, like request_cancel: a worker ending the job in between wins.
        res = db.execute(
            update(Job).where(Job.id == job.id, Job.status == observed).values(pause_requested=True)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount == 1:
            db.refresh(job)
            job.preempted_by = None
            if observed == states.QUEUED:
                job.pause_requested = False
                return states.transition(db, job, states.PAUSED, "Job paused before it started.")
            states.add_event(db, job, "Pause requested; the trainer saves a checkpoint, then frees its GPUs.",
                             type="status")
            return job
        db.rollback()
        db.refresh(job)
    raise states.IllegalTransition(job.id, job.status, states.PAUSED)


def request_resume(db: Session, job: Job) -> Job:
    """paused -> queued, within its owner's quotas; the caller commits, then enqueues.

    A running job whose user asked it to pause, and whose worker has not honoured that yet, keeps
    running: the pause is withdrawn. Every other status is IllegalTransition, a running job's
    above all: running -> queued is the reaper's move, and taking it here would drop the worker's
    lease and restart the job from its last checkpoint. A preemption is the scheduler's and is
    not withdrawn by a resume.
    """
    for _ in range(5):
        observed = job.status
        if observed == states.RUNNING and job.pause_requested and job.preempted_by is None:
            # Conditioned, like request_pause: a worker that paused the job in between makes it
            # fail, and the job is then resumed from paused instead of reported running.
            res = db.execute(
                update(Job).where(Job.id == job.id, Job.status == states.RUNNING, Job.pause_requested.is_(True),
                                  Job.preempted_by.is_(None))
                .values(pause_requested=False).execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:
                db.refresh(job)
                states.add_event(db, job, "Pause withdrawn.", type="status")
                return job
        elif observed == states.PAUSED:
            # Under the owner's lock, taken before the job's row as creation takes it before its
            # insert: concurrent creations and resumes are counted one after another.
            limits.check_resume_quota(db, job)
            # Conditioned on paused: a cancel that ended the job meanwhile is not overwritten.
            res = db.execute(
                update(Job).where(Job.id == job.id, Job.status == states.PAUSED)
                .values(pause_requested=False).execution_options(synchronize_session=False)
            )
            if res.rowcount == 1:
                db.refresh(job)
                return states.transition(db, job, states.QUEUED, "Job resumed; it continues from its latest checkpoint.")
        else:
            preempted = observed == states.RUNNING and job.preempted_by is not None
            why = "it is being preempted and resumes by itself" if preempted else "only a paused job can be resumed"
            raise states.IllegalTransition(job.id, observed, states.QUEUED, why)
        db.rollback()
        db.refresh(job)
    raise states.IllegalTransition(job.id, job.status, states.QUEUED, "it changed while resuming; try again")


def preempt(db: Session, victim: Job, for_job: Job) -> bool:
    """Ask the worker running `victim` to pause it for `for_job`; False if it is not running."""
    res = db.execute(
        update(Job).where(Job.id == victim.id, Job.status == states.RUNNING, Job.pause_requested.is_(False))
        .values(pause_requested=True).execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.rollback()
        return False
    db.refresh(victim)
    victim.preempted_by = for_job.id
    states.add_event(
        db, victim,
        f"Preempted: job {for_job.id} (priority {for_job.priority}) needs the GPUs of this job "
        f"(priority {victim.priority}); it pauses at a checkpoint and resumes when GPUs are free.",
        type="preempted", level="warning", data={"for_job": for_job.id, "priority": for_job.priority},
    )
    db.commit()
    return True


def after_pause(db: Session, job: Job, *, withdrawn: bool = False) -> None:
    """Called right after running -> paused: a preempted job goes straight back to the queue, and
    so does one whose pause the user withdrew (a resume) while its trainer was already stopping."""
    if job.preempted_by:
        job.preempted_by = None
        states.transition(db, job, states.QUEUED, "Job re-queued after preemption; it resumes when GPUs are free.")
    elif withdrawn:
        states.transition(db, job, states.QUEUED, "Pause withdrawn while the trainer was stopping; job re-queued, "
                                                  "it continues from its latest checkpoint.")
