"""Re-queue jobs whose worker stopped heartbeating (crash, SIGKILL, lost host).

A lease is stale only when its holder missed its renewals while the database could take them.
During a database outage (restart, failover) no worker can renew, so every lease ages; judged
right after the database comes back, live workers would lose their jobs while their trainers
still run. So this process watches the database itself (DatabaseWatch) and judges leases only
once it has seen the database reachable, without a break, for a whole lease TTL: every live
holder has had that long to renew. The same gate holds for taking over a stale lease directly
(worker.placement). Each process (worker, any host) keeps its own watch; a process that has just
started judges nothing before it has watched for a TTL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import text

from core.db import session_scope
from core.jobs import reap_stale
from core.queue import enqueue_job
from core.settings import get_settings

log = logging.getLogger(__name__)


class DatabaseWatch:
    """Since when this process has seen the database reachable without a break.

    `saw_up` and `saw_down` report each contact; contacts further apart than `max_gap_s` count
    as a break too (the watcher was starved or suspended and could not see an outage meanwhile).
    Times are the process's monotonic clock: a change of the wall clock moves nothing here.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.lock = threading.Lock()
        self.up_since: float | None = None
        self.last_up: float | None = None

    def saw_up(self, max_gap_s: float) -> None:
        with self.lock:
            t = self.clock()
            if self.up_since is None or self.last_up is None or t - self.last_up > max_gap_s:
                if self.up_since is not None:
                    log.warning("the database was not watched for %.0f s; judging no lease for a TTL", t - self.last_up)
                self.up_since = t
            self.last_up = t

    def saw_down(self) -> None:
        with self.lock:
            self.up_since = self.last_up = None

    def up_for(self, max_gap_s: float) -> float:
        """Seconds the database has been seen up without a break, 0 after a break or too long unwatched."""
        with self.lock:
            t = self.clock()
            if self.up_since is None or self.last_up is None or t - self.last_up > max_gap_s:
                return 0.0
            return t - self.up_since

    def may_judge_leases(self, ttl_s: float) -> bool:
        return self.up_for(max_gap(ttl_s)) >= ttl_s


# The watch of this process: fed by its ReaperThread, read by the reaper and worker.placement.
WATCH = DatabaseWatch()


def max_gap(ttl_s: float) -> float:
    """Contacts this far apart are a break: an outage that could age a live lease past the TTL
    lasts longer than TTL - heartbeat_s, over half the TTL (heartbeat_s is a small part of it),
    so it cannot fall between two contacts of this gap unseen."""
    return ttl_s / 2


def probe_every(ttl_s: float, heartbeat_s: float) -> float:
    return min(heartbeat_s, ttl_s / 4)


def probe(watch: DatabaseWatch = WATCH) -> bool:
    """One contact with the database, reported to `watch`."""
    gap = max_gap(get_settings().lease_ttl_s)
    try:
        with session_scope() as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is a break
        watch.saw_down()
        log.warning("database unreachable: %s", exc)
        return False
    watch.saw_up(gap)
    return True


def reap_once(watch: DatabaseWatch = WATCH) -> list[str]:
    """One pass: stale jobs go back to `queued` (committed), then their ids to the broker.

    Nothing is judged until `watch` has seen the database up for a whole TTL (module doc)."""
    ttl = get_settings().lease_ttl_s
    if not watch.may_judge_leases(ttl):
        log.info("reaper: the database has been seen up for %.0f s of the %.0f s lease TTL; no lease judged yet",
                 watch.up_for(max_gap(ttl)), ttl)
        return []
    try:
        with session_scope() as db:
            ids = reap_stale(db, ttl)
    except Exception:
        watch.saw_down()
        raise
    for job_id in ids:
        log.warning("job %s: its worker stopped heartbeating; re-queued", job_id)
        enqueue_job(job_id)
    return ids


class ReaperThread(threading.Thread):
    """Watches the database and runs reap_once every lease_ttl_s / 2 in every worker process, so
    no extra service is needed."""

    def __init__(self, interval_s: float | None = None, watch: DatabaseWatch = WATCH):
        super().__init__(name="tuneq-reaper", daemon=True)
        settings = get_settings()
        self.interval_s = interval_s or settings.lease_ttl_s / 2
        self.probe_s = min(self.interval_s, probe_every(settings.lease_ttl_s, settings.heartbeat_s))
        self.watch = watch
        self.stopped = threading.Event()

    def run(self) -> None:
        next_reap = time.monotonic() + self.interval_s
        probe(self.watch)
        while not self.stopped.wait(self.probe_s):
            if not probe(self.watch) or time.monotonic() < next_reap:
                continue
            next_reap = time.monotonic() + self.interval_s
            try:
                reap_once(self.watch)
            except Exception:  # a DB or broker hiccup must not end the thread
                log.exception("reaper pass failed; retrying in %.0f s", self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
