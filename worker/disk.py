"""Room on this host's work disk: a worker whose disk is nearly full takes no new job.

Checkpoints (with optimizer state) and final weights are written there before they reach the
store; a job started on a full disk would fail at its first checkpoint, as the user's error.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.models import Job
from core.settings import Settings

log = logging.getLogger(__name__)

GIB = 1024**3


def free_gib(path: Path) -> float:
    """Free GiB of the disk that holds path (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / GIB


def disk_state(settings: Settings) -> dict[str, float | bool]:
    """What the registry says of this host's work disk."""
    free = free_gib(settings.resolved_work_dir())
    return {"disk_free_gib": round(free, 1), "disk_full": free < settings.min_free_disk_gib}


def sweep_work_dirs(db: Session, settings: Settings, host: str, busy: set[str]) -> list[str]:
    """Remove the work directories this host keeps for nothing: of ended (or deleted) jobs, and
    of jobs that moved on to another host (a paused job resumed there). Whatever they held that
    matters is in the store. `busy`: jobs holding GPUs here, whose directory is in use."""
    root = settings.resolved_work_dir()
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("ftjob-") and p.name not in busy]
    if not names:
        return []
    jobs = {r.id: r for r in db.execute(select(Job.id, Job.status, Job.host).where(Job.id.in_(names)))}
    db.rollback()
    gone = [n for n in names if n not in jobs or jobs[n].status in states.TERMINAL
            or (jobs[n].host and jobs[n].host != host)]
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    if gone:
        log.info("removed the work directories of %s: ended, or running elsewhere", gone)
    return gone
