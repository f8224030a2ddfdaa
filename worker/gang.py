"""A follower host's part in a job across hosts (core/gang.py): join, lock the GPUs, start this
host's ranks against the leader's rendezvous, and stop them when the gang ends.

The leader's worker does everything else (events, checkpoints, the final status): its rank 0
writes the events and checkpoints. A follower only heartbeats its gang row, passes a cancel on
as SIGTERM (a pause reaches its ranks through the leader's, which vote on it every step), and
records how its trainer ended, which the leader watches.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time


from core import gang, states
from core.db import OUTAGE_ERRORS, get_sessionmaker, session_scope
from core.models import Checkpoint, Job
from core.settings import Settings
from core.storage import get_storage
from trainer.tracking import JOB_ID_ENV
from worker.checkpoint_store import prepare_resume
from worker.gpus import GpuPool, Reservation
from worker.preemption import coming_free
from worker.process import SUPERVISOR_ENV, TrainerProcess, kill_strays
from worker.workdir import Rendezvous, SpecError, job_dir, runnable_spec, trainer_argv, trainer_env, write_spec

log = logging.getLogger(__name__)

POLL_S = 0.25


class Follow:
    """The HostThread's duty: start a Member for each gang that reserved this host."""

    def __init__(self, pool: GpuPool, worker_id: str, settings: Settings, shutdown: threading.Event):
        self.pool, self.worker_id, self.settings, self.shutdown = pool, worker_id, settings, shutdown
        self.members: dict[tuple[str, int], Member] = {}

    def __call__(self) -> None:
        if self.shutdown.is_set():
            return
        with session_scope() as db:
            rows = gang.invitations(db, self.pool.host)
        self.members = {k: m for k, m in self.members.items() if m.is_alive()}
        for row in rows:
            key = (row.job_id, row.attempt)
            if key not in self.members:
                m = Member(row.job_id, row.node_rank, row.attempt, row.gpus, self)
                self.members[key] = m
                m.start()


class Member(threading.Thread):
    def __init__(self, job_id: str, node_rank: int, attempt: int, gpus: int, follow: Follow):
        super().__init__(name=f"gang-{job_id}-{node_rank}", daemon=True)
        self.job_id, self.node_rank, self.attempt, self.gpus = job_id, node_rank, attempt, gpus
        self.pool, self.worker_id, self.settings = follow.pool, follow.worker_id, follow.settings
        self.shutdown = follow.shutdown
        self.dir = job_dir(self.settings, job_id)

    def run(self) -> None:
        db = get_sessionmaker()()
        beat = Beat(self)
        try:
            if not gang.join(db, self.job_id, self.node_rank, self.attempt, self.worker_id):
                return  # another worker of this host took the place, or the gang is gone
            log.info("job %s: joined as host %s of its gang (attempt %s)", self.job_id, self.node_rank, self.attempt)
            beat.start()
            reservation = self.reserve(db, beat)
            if reservation is None:
                gang.member_exited(db, self.job_id, self.node_rank, self.attempt, gang.GPUS_BUSY)
                return
            try:
                code = self.play(db, beat, reservation)
            finally:
                self.pool.release(reservation)
            gang.member_exited(db, self.job_id, self.node_rank, self.attempt, code)
            self.clean_up(db)
        except Exception:  # noqa: BLE001 - the leader sees the member fall silent and stops the job
            log.exception("job %s: this host's part failed", self.job_id)
        finally:
            beat.stop.set()
            db.close()

    def reserve(self, db, beat: Beat) -> Reservation | None:  # noqa: ANN001
        """This host's GPUs for the job: the registry said they were free, but a job of this host may
        still be giving them back; wait for them as long as the leader waits for this host. A job
        that took them as the gang formed is paused if the gang outranks it; one that keeps them
        ends the wait at once (the attempt ends uncounted, and the job forms again)."""
        deadline = time.monotonic() + self.settings.gang_join_timeout_s
        while time.monotonic() < deadline and not self.shutdown.is_set() and not beat.gone.is_set():
            if (r := self.pool.reserve(self.gpus, owner=self.job_id)) is not None:
                return r
            job = db.get(Job, self.job_id, populate_existing=True)
            if job is None or not coming_free(db, self.pool, job, self.gpus):
                break
            time.sleep(POLL_S)
        log.warning("job %s: this host's GPUs did not come free for it", self.job_id)
        return None

    def play(self, db, beat: Beat, reservation: Reservation) -> int:  # noqa: ANN001
        """Run this host's ranks to their end; their exit code (-1: never started)."""
        while beat.standing.endpoint is None and not beat.gone.is_set() and not self.shutdown.is_set():
            time.sleep(POLL_S)
        standing = beat.standing
        if beat.gone.is_set() or standing.endpoint is None:
            return -1
        job = db.get(Job, self.job_id, populate_existing=True)
        try:
            spec = runnable_spec(db, job)  # read after the leader's ready: the spec it runs
        except SpecError as exc:
            log.warning("job %s: %s", self.job_id, exc)
            return -1
        self.dir.mkdir(parents=True, exist_ok=True)
        kill_strays(self.dir)
        resume = self.place_checkpoint(db, standing.resume_checkpoint)
        addr, _, port = standing.endpoint.rpartition(":")
        kind = self.pool.kind
        procs = len(reservation.indices) if kind == "gpu" else 1
        meet = Rendezvous(addr, int(port), standing.nodes, self.node_rank)
        argv = trainer_argv(self.settings, write_spec(self.dir, spec), self.dir, resume, num_processes=procs,
                            rendezvous=meet)
        env = {**trainer_env(self.settings), SUPERVISOR_ENV: str(os.getpid()), JOB_ID_ENV: self.job_id,
               **reservation.env(kind)}
        proc = TrainerProcess(argv, cwd=self.dir, log_path=self.dir / "trainer.log", env=env)
        log.info("job %s: host rank %s trainer pid %s started, meeting at %s%s", self.job_id, self.node_rank, proc.pid,
                 standing.endpoint, " (resuming)" if resume else "")
        states.add_event(db, job, f"Host {self.pool.host} started its part of the job (host rank {self.node_rank}).",
                         type="message", data={"gang_host": self.pool.host, "node_rank": self.node_rank,
                                               "attempt": self.attempt, "worker": self.worker_id, "resume": resume})
        db.commit()
        try:
            return self.supervise(beat, proc)
        finally:
            if not proc.finished():
                proc.kill()

    def supervise(self, beat: Beat, proc: TrainerProcess) -> int:
        cancelled = False
        while not proc.finished():
            if beat.gone.is_set() or self.shutdown.is_set():
                # The attempt ended (the leader stopped it, or it was reaped) or this worker stops.
                log.warning("job %s: the gang's attempt %s is over; stopping this host's ranks", self.job_id,
                            self.attempt)
                proc.kill()
                break
            if beat.standing.cancel and not cancelled:
                proc.send(signal.SIGTERM)
                cancelled = True
            time.sleep(POLL_S)
        code = proc.returncode
        return code if code is not None else -1

    def place_checkpoint(self, db, checkpoint_id: str | None) -> bool:  # noqa: ANN001
        """Leave in the work directory the checkpoint the leader resumes from (fetched from the store
        unless a local copy matches it): every rank loads the same one."""
        if checkpoint_id is None:
            shutil.rmtree(self.dir / "checkpoints", ignore_errors=True)
            return False
        ck = db.get(Checkpoint, checkpoint_id)
        got = prepare_resume(db, get_storage(), self.job_id, self.dir, only=ck)
        return got is not None

    def clean_up(self, db) -> None:  # noqa: ANN001
        """Keep nothing once the job has ended; the leader stores the model and logs. This host's
        trainer log goes to the store beside the leader's."""
        log_file = self.dir / "trainer.log"
        try:
            if log_file.is_file():
                get_storage().put_file(f"jobs/{self.job_id}/logs/trainer-attempt-{self.attempt}-host-{self.node_rank}.log",
                                       log_file)
        except Exception:  # noqa: BLE001 - a lost log must not stop the clean-up
            log.warning("job %s: could not store this host's trainer.log", self.job_id, exc_info=True)
        job = db.get(Job, self.job_id, populate_existing=True)
        db.rollback()
        if job is None or job.status in states.TERMINAL:
            shutil.rmtree(self.dir, ignore_errors=True)


class Beat(threading.Thread):
    """Renews a member's gang row from a thread of its own for as long as the member runs (fetching
    files and checkpoints too), and keeps what it learns: the leader's standing, or that the
    attempt is gone."""

    def __init__(self, member: Member):
        super().__init__(name=f"gang-beat-{member.job_id}", daemon=True)
        self.m = member
        self.stop = threading.Event()
        self.gone = threading.Event()
        self.standing = gang.Standing(None, None, False, 0)  # nothing known yet
        self.every_s = min(member.settings.heartbeat_s, 1.0)  # also how soon the leader's ready is seen

    def run(self) -> None:
        m = self.m
        with get_sessionmaker()() as db:
            while not self.stop.is_set():
                try:
                    standing = gang.beat(db, m.job_id, m.node_rank, m.attempt, m.worker_id)
                except OUTAGE_ERRORS as exc:
                    db.rollback()  # unknown: go on; the leader judges the silence
                    log.warning("job %s: gang heartbeat failed: %s", m.job_id, exc)
                else:
                    if standing is None:
                        self.gone.set()
                        return
                    self.standing = standing
                self.stop.wait(self.every_s)
