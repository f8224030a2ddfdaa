"""`python -m worker.health`: exit 0 while a worker of this host is registered (the container healthcheck).

A worker refreshes its registration every dispatch interval from the same thread that re-sends
queued jobs, so a stale or missing key means that thread, or the process, is stuck or gone.

`python -m worker.health --ready`: also that each of them has its standby trainers done importing
(worker.standby), so that a job it takes now waits on no warm-up. Not for a liveness check: a
worker that runs jobs has fewer standbys ready until it refills.
"""

from __future__ import annotations

import socket
import sys

import redis

from core import workers
from core.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    ready = "--ready" in (sys.argv[1:] if argv is None else argv)
    host = get_settings().host_id or socket.gethostname()
    try:
        mine = [w for w in workers.registered() if w.get("host") == host]
    except redis.RedisError as exc:
        print(f"unhealthy: Redis: {exc}")
        return 1
    if not mine:
        print(f"unhealthy: no worker of host {host!r} is registered")
        return 1
    if ready:
        waiting = [w for w in mine if (w.get("standby") or {}).get("ready", 0) < (w.get("standby") or {}).get("wanted", 0)]
        if waiting:
            print("not ready: " + ", ".join(f"{w['worker_id']} has {w['standby']['ready']} of {w['standby']['wanted']} "
                                            "standby trainers ready" for w in waiting))
            return 1
    print(f"{'ready' if ready else 'ok'}: {', '.join(w['worker_id'] for w in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
