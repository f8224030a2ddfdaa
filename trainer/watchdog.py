"""The trainer ends when the process that supervises it dies.

The trainer runs in a session of its own (signals meant for its supervisor must not reach it), so
a supervisor killed with SIGKILL takes nothing with it. Left running, the orphan holds a GPU that
no one tracks any more (the next run of the job, or another job, would share it) and goes on
writing into a work directory that the next run of its job needs for itself. Waiting for another
supervisor on the host to find and kill it is not enough: there may be none for a long time.

Every process of the trainer (each rank of a multi-GPU job too) watches the supervisor's pid,
which the supervisor passes in SUPERVISOR_ENV, and kills itself within a poll once it is gone.
A parent-death signal (PR_SET_PDEATHSIG) would reach only the launched process, not the ranks
that `accelerate launch` or torchrun start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

# The supervisor's pid, set by whoever launches the trainer (the worker); unset: no watchdog.
SUPERVISOR_ENV = "TUNEQ_SUPERVISOR_PID"
POLL_S = 1.0


def alive(pid: int) -> bool:
    """A zombie counts as dead: its parent may never reap it (a container without an init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def supervisor_pid() -> int | None:
    value = os.environ.get(SUPERVISOR_ENV, "")
    return int(value) if value.isdigit() else None


def watch_supervisor(poll_s: float = POLL_S) -> threading.Thread | None:
    """Start a daemon thread that SIGKILLs this process once the supervisor is gone."""
    pid = supervisor_pid()
    if pid is None:
        return None

    def watch() -> None:
        while alive(pid):
            time.sleep(poll_s)
        print(f"trainer: supervisor {pid} is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="tuneq-supervisor-watch", daemon=True)
    thread.start()
    return thread
