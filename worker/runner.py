"""One delivery of `tuneq.run_job`: lease, launch the trainer, supervise it, record the outcome.

The database decides who runs a job (docs/architecture.md, reliability): everything here happens under the
lease taken at the start, and the final status is written only while that lease still holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core import control, gang, states
from core.db import OUTAGE_ERRORS, get_sessionmaker
from core.inference import fine_tuned_model_name
from core.jobs import heartbeat, lock_leased_job, release_lease
from core.models import Checkpoint, Job
from core.queue import clear_pending, enqueue_job
from core.results import store_results
from core.retries import USER_ERRORS, retry_or_fail
from core.scheduling import RETRY_AT
from core.settings import Settings, get_settings
from core.storage import get_storage
from trainer.tracking import JOB_ID_ENV, WANDB_DIR
from worker import placement, reaper
from worker.artifacts import Stored, final_manifest, publish_final, publish_logs
from worker.checkpoint_store import (
    Uploader, keep_checkpoints, prepare_resume, selection_metric, unstored_snapshots, uploaded,
)
from worker.events import EventTail, ProgressTracker
from worker.gpus import GpuPool, Reservation, get_pool
from worker.process import SUPERVISOR_ENV, TrainerProcess, kill_strays
from worker.standby import POOL as STANDBYS
from worker.template import TEMPLATE
from worker.tensorboard_log import TensorBoardLog, import_writer
from worker.workdir import (
    Rendezvous, SpecError, job_dir, rendezvous_addr, rendezvous_port, runnable_spec, trainer_argv, trainer_env, write_spec,
)

log = logging.getLogger(__name__)

# Set by the Celery app on warm shutdown: running jobs stop their trainer and go back to the queue.
SHUTDOWN = threading.Event()

# The trainer's error code for a failed collective (a peer rank died): an infrastructure failure.
DISTRIBUTED_ERROR = "distributed"
# Out of GPU memory: the job moves to larger GPUs when the cluster has some, else the user's error.
OOM_ERROR = "oom"
EXIT_PAUSED = 75  # the trainer saved a checkpoint on SIGUSR1 and stopped (EX_TEMPFAIL)
POLL_S = 0.25
CANCEL_GRACE_S = 10.0
# A pause or a shutdown lets the trainer write a checkpoint first; that can take a while.
CHECKPOINT_GRACE_S = 120.0
LOG_TAIL_CHARS = 2000
FINAL = "final"  # the trainer's export folder in the work directory
WANDB_ARTIFACT = "wandb.tar.gz"  # DIR/wandb/: the offline W&B runs of the job's attempts on this host


def default_worker_id(settings: Settings) -> str:
    return settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: str, worker_id: str | None = None) -> str:
    """Run one job to its end; return the outcome.

    Outcomes: a final status (succeeded, failed, cancelled, paused), `queued` (preempted or
    retried), `requeued` (worker shutdown), `lost` (another worker took the lease), `skipped`
    (not runnable by this delivery), `deferred` (no free GPUs for it here; it is re-sent later).
    A message is a wake-up as much as an order: when a job ahead of this one in the queue fits
    the free GPUs, that job runs instead, so no GPU idles while a fitting job waits.
    """
    settings = get_settings()
    worker_id = worker_id or default_worker_id(settings)
    pool = get_pool(settings)
    db = get_sessionmaker()()
    try:
        try:
            taken = placement.take(db, pool, job_id, worker_id, settings)
        finally:
            # Only now: cleared before the lease, a dispatcher could see the job queued with no
            # message in flight and send a second one.
            clear_pending(job_id)
        if isinstance(taken, str):
            if taken == "skipped":
                _log_skip(db, job_id)
            return taken
        job, reservation = taken
        try:
            return JobRun(db, job, worker_id, settings, pool, reservation).execute()
        finally:
            pool.release(reservation)
    finally:
        db.close()


def _log_skip(db: Session, job_id: str) -> None:
    job = db.get(Job, job_id)
    if job is None:
        log.warning("job %s does not exist; dropping the message", job_id)
    elif job.status == states.RUNNING:
        log.info("job %s is leased by %s (attempt %s); dropping this duplicate delivery",
                 job_id, job.lease_owner, job.lease_attempt)
    else:
        log.info("job %s is %s; nothing to run", job_id, job.status)
    db.rollback()


class LeaseKeeper:
    """Renews a run's lease from a thread of its own (own database session) for the whole
    attempt: fetching files, the trainer, publishing gigabytes, database retries. None of those
    can starve it, so the reaper takes a job only from a worker that is really gone.

    `lost` is set once the lease is gone (reaped or taken over); the run checks it and stops. A
    database outage is only logged here: the run's own database calls give up after half the
    TTL (JobRun.with_db), and the final transition happens only under the lease. After a failed
    renewal the next one is tried within RETRY_S, so the lease is fresh soon after the database
    is back (the reaper waits a TTL after an outage before it judges any lease: worker.reaper).
    """

    RETRY_S = 1.0

    def __init__(self, job_id: str, worker_id: str, attempt: int, every_s: float):
        self.job_id, self.worker_id, self.attempt, self.every_s = job_id, worker_id, attempt, every_s
        self.stop = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"lease-{job_id}", daemon=True)
        self.beats = 0
        self.failures = 0  # renewals failed in a row

    def _beat(self) -> None:
        while not self.stop.wait(min(self.every_s, self.RETRY_S) if self.failures else self.every_s):
            try:
                with get_sessionmaker()() as db:
                    if heartbeat(db, self.job_id, self.worker_id, self.attempt) is None:
                        if not self.stop.is_set():  # else the run just ended and released it
                            log.warning("job %s: lease lost (attempt %s)", self.job_id, self.attempt)
                            self.lost.set()
                        return
                self.beats += 1
                if self.failures:
                    log.info("job %s: lease renewed again after %s failed renewals", self.job_id, self.failures)
                self.failures = 0
            except OUTAGE_ERRORS as exc:
                self.failures += 1
                log.warning("job %s: heartbeat failed: %s", self.job_id, exc)
            except Exception:  # noqa: BLE001 - a keeper that dies stops renewing: the job looks lost
                self.failures += 1
                log.exception("job %s: heartbeat failed", self.job_id)

    def __enter__(self) -> LeaseKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(self.every_s + 10)


class Runs:
    """The job runs of this process, by job. The same worker can be handed a job again while an
    earlier attempt of it still runs here (its lease was taken from it, e.g. re-queued by a
    reaper): the earlier run is told its lease is gone and the new one waits until it has
    stopped its trainer, so the job never trains twice at once in one work directory."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_job: dict[str, JobRun] = {}

    def enter(self, run: JobRun) -> JobRun | None:
        """Register `run`; return the earlier run of its job in this process, if one is still going."""
        with self.lock:
            earlier = self.by_job.get(run.job_id)
            self.by_job[run.job_id] = run
            return earlier

    def leave(self, run: JobRun) -> None:
        with self.lock:
            if self.by_job.get(run.job_id) is run:
                del self.by_job[run.job_id]


RUNS = Runs()


def supersede(earlier: JobRun, wait_s: float) -> bool:
    """Stop an earlier attempt of the same job in this process; True once it has ended."""
    log.warning("job %s: attempt %s still runs in this worker; stopping it before attempt %s starts",
                earlier.job_id, earlier.attempt, earlier.attempt + 1)
    earlier.keeper.lost.set()  # its lease is ours now: it stops its trainer and writes nothing more
    if not earlier.done.wait(wait_s):
        log.warning("job %s: attempt %s did not stop within %.0f s; its trainer is killed as a stray",
                    earlier.job_id, earlier.attempt, wait_s)
        return False
    return True


class JobRun:
    def __init__(self, db: Session, job: Job, worker_id: str, settings: Settings, pool: GpuPool | None = None,
                 reservation: Reservation | None = None):
        self.db = db
        self.pool = pool
        self.reservation = reservation
        self.job = job
        self.job_id = job.id
        self.worker_id = worker_id
        self.attempt = job.lease_attempt
        self.settings = settings
        self.dir = job_dir(settings, job.id)
        self.tracker = ProgressTracker(self.dir, pool.host if pool else None)
        self.tail = EventTail(self.dir / "events.jsonl", self.dir / "events.offset")
        self.tensorboard = TensorBoardLog(self.dir / "tensorboard")
        self.ended_here = False  # this run wrote the job's final status (or found it ended)
        self.nodes = job.nodes  # hosts the job spans: above 1, this worker leads it (core/gang.py)
        self.gang_join_by = float("inf")  # a job across hosts: when every other host must have joined
        self.gang_problem: gang.Problem | None = None
        self.keeper = LeaseKeeper(self.job_id, self.worker_id, self.attempt, settings.heartbeat_s)
        self.done = threading.Event()  # execute returned (RUNS)

    def execute(self) -> str:
        earlier = RUNS.enter(self)
        try:
            with self.keeper:  # renewing already while an earlier attempt stops
                if earlier is not None:
                    supersede(earlier, CHECKPOINT_GRACE_S)
                with Uploader(get_storage(), self.job_id, keep_checkpoints(self.job.spec),
                              may_write=lambda: not self.keeper.lost.is_set(),
                              metric=selection_metric(self.job.spec)) as self.uploader:
                    outcome = self.attempt_run()
        finally:
            RUNS.leave(self)
            self.done.set()
        if outcome in states.TERMINAL and self.ended_here:
            self.clean_up()
        return outcome

    def attempt_run(self) -> str:
        # Events a killed attempt left unread: its trainer may have finished just before.
        self.with_db(self.pump)
        if self.job.trained_at is not None and (outcome := self.publish_trained()) is not None:
            return outcome
        if self.pool is not None and (fitted := placement.fit_to_host(self.db, self.job, self.pool)):
            states.add_event(self.db, self.job, f"Planned for this host: {fitted}.", type="message")
        self.db.commit()
        try:
            spec = runnable_spec(self.db, self.job)
        except SpecError as exc:
            error = {"code": exc.code, "message": str(exc), "param": exc.param}
            return self.finish(states.FAILED, f"Job failed: {exc}", error=error)
        self.dir.mkdir(parents=True, exist_ok=True)
        if strays := kill_strays(self.dir):
            log.warning("job %s: killed trainer processes %s left by an earlier attempt", self.job_id, strays)
        checkpoint = self.with_db(self.prepare_resume)
        resume = checkpoint is not None
        devices = self.reservation.indices if self.reservation else []
        kind = self.pool.kind if self.pool else "cpu"
        procs = len(devices) if kind == "gpu" and devices else 1
        meet = None
        if self.nodes > 1:
            # The other hosts start their ranks once told where to meet and what to resume from.
            meet = Rendezvous(rendezvous_addr(self.settings), rendezvous_port(self.settings), self.nodes, 0)
            self.with_db(gang.mark_ready, self.db, self.job_id, self.attempt, f"{meet.addr}:{meet.port}",
                         checkpoint.id if checkpoint is not None else None)
            self.gang_join_by = time.time() + self.settings.gang_join_timeout_s
        argv = trainer_argv(self.settings, write_spec(self.dir, spec), self.dir, resume, num_processes=procs,
                            rendezvous=meet)
        # The job id names the trainer's W&B run (trainer.tracking).
        env = {**trainer_env(self.settings), SUPERVISOR_ENV: str(os.getpid()), JOB_ID_ENV: self.job_id}
        if self.reservation:
            env.update(self.reservation.env(kind))
        proc = TrainerProcess(argv, cwd=self.dir, log_path=self.dir / "trainer.log", env=env, standbys=STANDBYS,
                              give_up=lambda: self.keeper.lost.is_set() or SHUTDOWN.is_set(), template=TEMPLATE)
        import_writer()  # while the trainer starts up: the curves are written from its first step
        how = "forked from the template" if proc.forked else "took the job as a standby" if proc.standby else "started"
        log.info("job %s: trainer pid %s %s on %s %s (attempt %s%s)", self.job_id, proc.pid, how, kind, devices,
                 self.attempt, ", resuming" if resume else "")
        host = self.pool.host if self.pool else None
        self.job.host = host
        states.add_event(self.db, self.job, "Resuming from the latest checkpoint." if resume else "Trainer started.",
                         type="message", data={"pid": proc.pid, "worker": self.worker_id, "resume": resume,
                                               "attempt": self.attempt, "host": host, "devices": devices,
                                               "device_kind": kind, "standby": proc.standby,
                                               "forked": proc.forked})
        self.db.commit()
        try:
            stopped_by = self.supervise(proc)
        finally:
            if not proc.finished():
                proc.kill()
            STANDBYS.refill(self.settings)
        # A database restart just as the trainer ends must not lose its last events or turn a
        # finished training into a retried one.
        self.with_db(self.pump)
        # Paused, preempted, crashed or done: whichever host runs the job next starts from the
        # newest checkpoint in the store, so every one written must be there first.
        if stopped_by != "lost" and not self.uploader.drain(give_up=self.keeper.lost.is_set):
            return "lost"
        return self.with_db(self.conclude, proc, stopped_by)

    def prepare_resume(self) -> Checkpoint | None:
        # Checkpoints an earlier attempt on this host announced but did not store go up first:
        # those whose events this attempt read again, then those whose upload it did not finish.
        self.uploader.drain(give_up=self.keeper.lost.is_set)
        self.db.commit()  # a fresh read of what the upload thread has just marked
        self.uploader.submit_all(unstored_snapshots(self.db, self.job_id, self.dir, self.tracker.host))
        self.uploader.drain(give_up=self.keeper.lost.is_set)
        ck = prepare_resume(self.db, get_storage(), self.job_id, self.dir, selection_metric(self.job.spec))
        if ck is not None:
            log.info("job %s: resuming from step %s (written on %s)", self.job_id, ck.step, ck.host)
        return ck

    # -- while the trainer runs -------------------------------------------------------------

    def supervise(self, proc: TrainerProcess) -> str | None:
        """Stream events, heartbeat and honour cancel/pause/shutdown until the trainer is gone.

        Returns why it was stopped (cancel, pause, shutdown, lost) or None if it ended by itself.
        """
        stopped_by: str | None = None
        kill_at = float("inf")
        next_gang_check = 0.0
        refilled = False
        while not proc.finished():
            self.with_db(self.pump)
            if self.tracker.started_up and not refilled:
                # Past its first step, the job no longer competes with a new standby's start-up; a
                # GPU left without a standby gets one now, the rest wait for the job's end.
                STANDBYS.refill(self.settings, only_missing=True)
                refilled = True
            now = time.monotonic()
            if self.keeper.lost.is_set():
                log.warning("job %s: lease lost (attempt %s); stopping the trainer", self.job_id, self.attempt)
                proc.kill()
                return "lost"
            if self.nodes > 1 and stopped_by is None and now >= next_gang_check:
                next_gang_check = now + self.settings.heartbeat_s
                ttl = self.settings.lease_ttl_s
                judged = ttl if reaper.WATCH.may_judge_leases(ttl) else None  # as the reaper judges leases
                if (problem := self.with_db(gang.problem, self.db, self.job_id, self.attempt, judged,
                                            self.gang_join_by, gang.MEMBER_EXIT_GRACE_S)) is not None:
                    # One host is gone or failed: every rank stops, the job resumes from its newest stored checkpoint.
                    log.warning("job %s: %s; stopping every rank", self.job_id, problem.message)
                    self.gang_problem = problem
                    proc.kill()
                    return "gang"
            if stopped_by is None and (stopped_by := self.stop_reason()):
                if stopped_by == "cancel":
                    log.info("job %s: cancel; sending SIGTERM to the trainer", self.job_id)
                    proc.send(signal.SIGTERM)
                    kill_at = now + CANCEL_GRACE_S
                else:
                    log.info("job %s: %s; asking the trainer to checkpoint and stop (pause file, SIGUSR1)",
                             self.job_id, stopped_by)
                    proc.ask_pause()
                    kill_at = now + CHECKPOINT_GRACE_S
            elif now >= kill_at:
                log.warning("job %s: trainer ignored %s for too long; killing it", self.job_id, stopped_by)
                proc.kill()
            time.sleep(POLL_S)
        return stopped_by

    def with_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call fn, riding out a database outage shorter than half the lease TTL.

        Past that the reaper may hand the job to another worker, so the error ends this run (the
        trainer is killed) rather than let two runs overlap.
        """
        for attempt in Retrying(
            retry=retry_if_exception_type(OUTAGE_ERRORS), wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(self.settings.lease_ttl_s / 2), reraise=True,
            before_sleep=lambda rs: (self.db.rollback(), log.warning("job %s: database error, retrying: %s",
                                                                      self.job_id, rs.outcome.exception())),
        ):
            with attempt:
                return fn(*args)
        return None

    def stop_reason(self) -> str | None:
        return self.with_db(self._stop_reason)

    def _stop_reason(self) -> str | None:
        cancel, pause = self.db.execute(
            select(Job.cancel_requested, Job.pause_requested).where(Job.id == self.job_id)
        ).one()
        self.db.rollback()  # end the read transaction: no snapshot held open between polls
        if cancel:
            return "cancel"
        if SHUTDOWN.is_set():
            return "shutdown"
        if pause:
            return "pause"
        return None

    def pump(self) -> None:
        """Store the events the trainer appended since the last call."""
        events = self.tail.read()
        if not events:
            return
        self.tracker.hold(events)
        for ev in events:
            self.tracker.apply(self.db, self.job, ev)
            self.tensorboard.add(ev)
        # Curves first: a crash before the commit re-reads these events and draws them twice,
        # which is better than never.
        self.tensorboard.flush()
        self.db.commit()
        self.tail.save_offset()
        self.uploader.submit_all(self.tracker.take_new_checkpoints())

    # -- the end ----------------------------------------------------------------------------

    def conclude(self, proc: TrainerProcess, stopped_by: str | None) -> str:
        if stopped_by == "lost":
            return "lost"
        if stopped_by == "gang":
            assert self.gang_problem is not None
            if not self.gang_problem.counts:
                return self.wait_for_hosts(self.gang_problem.message)
            return self.retry(self.gang_problem.message)
        if stopped_by == "shutdown":
            if release_lease(self.db, self.job_id, self.worker_id, self.attempt, "Worker shut down; job re-queued."):
                enqueue_job(self.job_id)
                return "requeued"
            return "lost"
        if stopped_by == "cancel":
            return self.finish(states.CANCELLED, "Job cancelled.")
        if proc.returncode == 0:  # a pause that came while the trainer was finishing is moot
            return self.succeed()
        if stopped_by == "pause" or proc.returncode == EXIT_PAUSED:
            return self.finish(states.PAUSED, "Job paused; resuming continues from the latest checkpoint.")
        err = self.tracker.last_error
        if err is not None and err.get("code") == OOM_ERROR and (larger := self.larger_gpus()) is not None:
            return self.move_to_larger_gpus(larger)
        if err is not None and err.get("code") == DISTRIBUTED_ERROR:
            # One rank of a multi-GPU job died and took the others down: the job is not at fault.
            return self.retry(f"a process of the trainer failed: {err.get('message')}")
        if err is None or (err.get("code") not in USER_ERRORS and (proc.returncode or 0) < 0):
            # No error of its own: the trainer was killed (OOM killer, a stray signal, a lost
            # device) or crashed; a re-run resumes from the checkpoint, within max_attempts.
            return self.retry(_death(proc.returncode))
        return self.finish(states.FAILED, "Job failed.", error=self.failure(proc.returncode))

    def larger_gpus(self) -> float | None:
        if self.pool is None:
            return None
        try:
            return placement.larger_gpus(self.job, self.pool)
        except redis.RedisError:
            log.warning("job %s: the worker registry is unreachable; no larger GPU to move to", self.job_id)
            return None

    def move_to_larger_gpus(self, larger: float) -> str:
        """Out of memory here, with larger GPUs in the cluster: back to the queue for those, not the
        user's error. The job's least memory rises above this host's, so it cannot land here again
        and each move goes up a size: no retry count is needed to end it."""
        job = lock_leased_job(self.db, self.job_id, self.worker_id, self.attempt)
        if job is None:
            return "lost"
        assert self.pool is not None
        here = self.pool.memory_gib
        if job.status == states.CANCELLING:
            states.transition(self.db, job, states.CANCELLED, "Job cancelled.")
            self.db.commit()
            return job.status
        job.min_gpu_memory_gib = max(job.min_gpu_memory_gib or 0.0, larger)
        message = (f"the trainer ran out of memory on {self.pool.host}'s {here:g} GiB GPUs; re-queued for GPUs "
                   f"of {larger:g} GiB or more")
        states.add_event(self.db, job, message[0].upper() + message[1:] + ".", type="message", level="warning",
                         data={"host": self.pool.host, "gpu_memory_gib": here, "min_gpu_memory_gib": larger})
        states.transition(self.db, job, states.QUEUED, f"Job re-queued: {message}.")
        self.db.commit()
        log.warning("job %s: %s", self.job_id, message)
        return states.QUEUED

    def wait_for_hosts(self, reason: str) -> str:
        """A job across hosts whose hosts were not all free after all (a job of one took its GPUs as the
        gang formed): back to the queue after a short wait, every host freed, no retry counted."""
        job = lock_leased_job(self.db, self.job_id, self.worker_id, self.attempt)
        if job is None:
            return "lost"
        if job.status == states.CANCELLING:
            states.transition(self.db, job, states.CANCELLED, "Job cancelled.")
        else:
            job.progress = {**(job.progress or {}), RETRY_AT: time.time() + max(1.0, self.settings.dispatch_interval_s)}
            states.transition(self.db, job, states.QUEUED, f"Job re-queued: {reason}; it waits for all its hosts.")
        self.db.commit()
        log.info("job %s: %s; %s", self.job_id, reason, job.status)
        return job.status

    def retry(self, reason: str) -> str:
        job = lock_leased_job(self.db, self.job_id, self.worker_id, self.attempt)
        if job is None:
            return "lost"
        requeued = retry_or_fail(self.db, job, reason)
        self.db.commit()
        log.warning("job %s: %s; %s", self.job_id, reason, "re-queued" if requeued else job.status)
        return states.QUEUED if requeued else job.status

    def publish_trained(self) -> str | None:
        """An earlier attempt's trainer finished: publish its model instead of training again.

        None when its files are on no disk this worker can reach (another host's work
        directory, before any was stored): then the job trains again.
        """
        if strays := kill_strays(self.dir):
            log.warning("job %s: killed trainer processes %s left by an earlier attempt", self.job_id, strays)
        if final_manifest(get_storage(), self.job_id, self.dir / FINAL) is None:
            log.warning("job %s: trained in an earlier attempt, but its model is not on this host; training again",
                        self.job_id)
            self.job.trained_at = None
            states.add_event(self.db, self.job, "The model of an earlier attempt is not reachable from this worker; "
                             "training again.", type="message", level="warning")
            self.db.commit()
            return None
        log.info("job %s: trained in an earlier attempt; publishing its model (attempt %s)", self.job_id, self.attempt)
        states.add_event(self.db, self.job, "Training finished in an earlier attempt; publishing its model.",
                         type="message", data={"worker": self.worker_id, "attempt": self.attempt})
        self.db.commit()
        return self.with_db(self.succeed)

    def succeed(self) -> str:
        final = self.dir / FINAL
        storage = get_storage()
        raw = final_manifest(storage, self.job_id, final)
        if raw is None:
            error = {"code": "internal", "message": "the trainer exited 0 but wrote no final/manifest.json", "param": None}
            return self.finish(states.FAILED, "Job failed.", error=error)
        # An attempt that did not see the trainer finish reads what it reported from the manifest.
        metrics = json.loads(raw).get("metrics") or {}
        finished = self.tracker.finished or {"metrics": metrics, "trained_tokens": metrics.get("trained_tokens")}
        kept = [ck.storage_key for ck in uploaded(self.db, self.job_id) if ck.storage_key]
        by_host = self.peaks_by_host(finished.get("peak_memory_bytes_by_rank"))
        self.db.rollback()  # no transaction held open while gigabytes move
        stored = publish_final(storage, self.job, final, kept)
        results = store_results(self.db, storage, self.job)  # OpenAI's result_files: the figures per step, as CSV
        self.db.rollback()

        def record(job: Job) -> None:
            self.db.add_all(s.row(job.id) for s in stored)
            job.fine_tuned_model = fine_tuned_model_name(job)
            job.trained_tokens = finished.get("trained_tokens", job.trained_tokens)
            job.metrics = {**job.metrics, **(finished.get("metrics") or {}), **by_host}
            job.progress = {**job.progress, "eta_seconds": 0}
            self.db.add(results)
            job.result_files = [results.id]

        return self.finish(states.SUCCEEDED, "The job has successfully completed.", before=record)

    def peaks_by_host(self, peaks: list[int | None] | None) -> dict[str, Any]:
        """A job across hosts: `peak_memory_bytes_by_host`, the largest peak of each host's ranks
        (rank r runs on the gang's host r // gpus); {} for a job of one host."""
        if self.nodes <= 1 or not peaks:
            return {}
        hosts = {m.node_rank: m.host for m in gang.members(self.db, self.job_id)}
        self.db.rollback()
        per = max(1, len(peaks) // self.nodes)
        out: dict[str, int | None] = {}
        for rank, peak in enumerate(peaks):
            host = hosts.get(rank // per, f"node-{rank // per}")
            known = [p for p in (out.get(host), peak) if p is not None]
            out[host] = max(known) if known else None
        return {"peak_memory_bytes_by_host": out}

    def failure(self, returncode: int | None) -> dict[str, Any]:
        err = self.tracker.last_error
        if err is not None:
            message = str(err["message"]) + (f" Hint: {err['hint']}" if err.get("hint") else "")
            if err.get("code") == OOM_ERROR and self.pool is not None and self.pool.memory_gib is not None:
                many = f" for a {self.job.gpus}-GPU job" if self.job.gpus > 1 else ""
                message += (f" It ran on {self.pool.host}'s {self.pool.memory_gib:g} GiB GPUs; no registered host "
                            f"has larger GPUs{many}.")
            return {"code": err.get("code") or "internal", "message": message, "param": err.get("param")}
        tail = _tail(self.dir / "trainer.log", LOG_TAIL_CHARS)
        return {"code": "internal", "message": f"The trainer exited with code {returncode}.\n{tail}", "param": None}

    def finish(self, target: str, message: str, *, error: dict[str, Any] | None = None,
               before: Callable[[Job], None] | None = None) -> str:
        """Write the final status, but only while this run still holds the lease."""
        # Outside the transaction, like publish_final: the curves of an ended job, downloadable.
        curves = self.publish_curves() if target in states.TERMINAL else []
        job = lock_leased_job(self.db, self.job_id, self.worker_id, self.attempt)
        if job is None:
            log.warning("job %s: lease lost before the end (attempt %s); leaving the job alone", self.job_id, self.attempt)
            return "lost"
        if job.status in states.TERMINAL:
            # Ended meanwhile by someone else (a cancel of a stale view of the job); keep that.
            self.db.commit()
            self.ended_here = True
            log.warning("job %s: already %s; not overwriting it with %s", self.job_id, job.status, target)
            return job.status
        if job.status == states.CANCELLING and target in (states.FAILED, states.PAUSED):
            target, message, error = states.CANCELLED, "Job cancelled.", None  # the user's cancel wins
        if before is not None:
            before(job)
        # The user resumed after this worker had told the trainer to stop: request_resume took the
        # flag back and answered that the job goes on, so it does, from the checkpoint just saved.
        withdrawn = target == states.PAUSED and not job.pause_requested and job.preempted_by is None
        if target == states.PAUSED:
            job.pause_requested = False  # honoured; a resume must not pause again at once
        if target in states.TERMINAL:
            self.db.add_all(stored.row(job.id) for stored in curves)
        states.transition(self.db, job, target, message, error=error)
        if target == states.PAUSED:
            control.after_pause(self.db, job, withdrawn=withdrawn)
        self.db.commit()
        self.ended_here = job.status in states.TERMINAL
        log.info("job %s: %s", self.job_id, job.status)
        if withdrawn:
            try:
                enqueue_job(self.job_id)
            except Exception:  # noqa: BLE001 - the host's dispatcher re-sends queued jobs anyway
                log.warning("job %s: enqueue after a withdrawn pause failed; the dispatcher will send it", self.job_id)
        return job.status

    def publish_curves(self) -> list[Stored]:
        """The TensorBoard files, and the offline W&B run of a job with a wandb integration."""
        storage = get_storage()
        found = [self.tensorboard.publish(storage, self.job_id, self.attempt),
                 publish_logs(storage, self.dir / WANDB_DIR, self.job_id, self.attempt, WANDB_ARTIFACT)]
        return [stored for stored in found if stored is not None]

    def clean_up(self) -> None:
        """An ended job leaves nothing on this host that the store does not hold: its model,
        checkpoints and curves are stored by now; the trainer's log goes there too."""
        log_file = self.dir / "trainer.log"
        try:
            if log_file.is_file():
                get_storage().put_file(f"jobs/{self.job_id}/logs/trainer-attempt-{self.attempt}.log", log_file)
        except Exception:  # noqa: BLE001 - a lost log must not keep gigabytes on the disk
            log.warning("job %s: could not store trainer.log", self.job_id, exc_info=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        log.info("job %s: work directory %s removed", self.job_id, self.dir)


def _death(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the trainer was killed by {name}"
    return f"the trainer exited with code {returncode} without reporting an error"


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
