"""Re-queue jobs whose worker stopped heartbeating (crash, SIGKILL, lost host)."""

from __future__ import annotations

import logging
import threading

from core.db import session_scope
from core.jobs import reap_stale
from core.queue import enqueue_job
from core.settings import get_settings

log = logging.getLogger(__name__)


def reap_once() -> list[str]:
    """One pass: stale jobs go back to `queued` (committed), then their ids to the broker."""
    with session_scope() as db:
        ids = reap_stale(db, get_settings().lease_ttl_s)
    for job_id in ids:
        log.warning("job %s: its worker stopped heartbeating; re-queued", job_id)
        enqueue_job(job_id)
    return ids


class ReaperThread(threading.Thread):
    """Runs reap_once every lease_ttl_s / 2 in every worker process, so no extra service is needed."""

    def __init__(self, interval_s: float | None = None):
        super().__init__(name="tuneq-reaper", daemon=True)
        self.interval_s = interval_s or get_settings().lease_ttl_s / 2
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                reap_once()
            except Exception:  # a DB or broker hiccup must not end the thread
                log.exception("reaper pass failed; retrying in %.0f s", self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
