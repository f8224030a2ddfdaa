"""Picking a TCP port for a server that another process will start and bind.

Asking the kernel for one (bind to port 0, read it, close) leaves a window before the server binds
it, and the kernel hands out the same range to outgoing connections as their local ports: on a busy
host a client's connection can take the port in that window, and the server then fails with
"address already in use". So the port is drawn below that range (Linux's
net.ipv4.ip_local_port_range), where only servers bind, and checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000  # below this lie the well-known and registered ports other services expect to own
TRIES = 64


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where unknown)."""
    try:
        low, high = (int(x) for x in PORT_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that nothing is bound to now, outside the ephemeral range where it can
    (see the module's docstring); the kernel's own pick where that range leaves no room."""
    low, _ = ephemeral_range()
    if low - LOWEST >= 1000:
        for _ in range(TRIES):
            port = random.randrange(LOWEST, low)
            if _bindable(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
