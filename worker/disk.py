"""Room on this host's work disk: a worker whose disk is nearly full takes no new job.

Checkpoints (with optimizer state) and final weights are written there before they reach the
store; a job started on a full disk would fail at its first checkpoint, as the user's error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from core.settings import Settings

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
