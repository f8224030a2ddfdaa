"""`python -m worker.health`: exit 0 while a worker of this host is registered (the container healthcheck).

A worker refreshes its registration every dispatch interval from the same thread that re-sends
queued jobs, so a stale or missing key means that thread, or the process, is stuck or gone.
"""

from __future__ import annotations

import socket
import sys

import redis

from core import workers
from core.settings import get_settings


def main() -> int:
    host = get_settings().host_id or socket.gethostname()
    try:
        mine = [w for w in workers.registered() if w.get("host") == host]
    except redis.RedisError as exc:
        print(f"unhealthy: Redis: {exc}")
        return 1
    if not mine:
        print(f"unhealthy: no worker of host {host!r} is registered")
        return 1
    print(f"ok: {', '.join(w['worker_id'] for w in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
