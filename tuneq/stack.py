"""`tuneq up`: the whole service on one machine, as child processes of one foreground command.

The API, the worker and the inference server run as separate processes, exactly as on a server,
so what works here works there. Each child gets its own session: Ctrl-C reaches only this supervisor, which then
stops the worker first (it checkpoints or stops its trainers on SIGTERM) and the API after it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO

import httpx

from tuneq.client import TuneqError

TINY_MODEL = "tiny-llama"
# Each child's log rotates at this size; this many older files are kept (api.log.1, ...).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
# The API answers once its own warm-up is done (api.warmup): imports of seconds, more on a busy host.
HEALTH_TIMEOUT_S = 180.0
# How long `tuneq up` waits to say it is ready (GET /readyz) before it says what it still waits on.
READY_TIMEOUT_S = 600.0
# The worker may checkpoint a running job before it exits; give it time to do so.
WORKER_GRACE_S = 60.0
API_GRACE_S = 10.0


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


def _tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def copy_rotated(stream: IO[bytes], path: Path, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """Copy a child's output into `path`, rotated at max_bytes with `backups` older files kept.

    The supervisor writes the logs, not the children, so one rotation covers whatever a child
    prints (its own logging, the server's, a crash on stderr).
    """
    handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for line in iter(stream.readline, b""):
            handler.emit(logging.makeLogRecord({"msg": line.decode("utf-8", "replace").rstrip("\n")}))
    finally:
        handler.close()


def private_home(home: Path) -> None:
    """home/ readable by its owner alone: it holds every tenant's data, keys and logs.

    The umask covers what this process and its children (API, worker, trainers, SQLite) create
    from now on; the walk fixes what an older version left world-readable.
    """
    os.umask(0o077)
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    for path in (home, *home.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod(0o700 if path.is_dir() or path.stat().st_mode & 0o100 else 0o600)


def _detached_redis(workdir: Path):  # noqa: ANN202 - EmbeddedRedis is imported lazily
    from tuneq.embedded import EmbeddedRedis

    return EmbeddedRedis(workdir=workdir, detached=True)


class Stack:
    def __init__(self, home: Path, host: str = "127.0.0.1", port: int = 8000, worker: bool = True,
                 log: Callable[[str], None] = print):
        self.home = Path(home).resolve()
        self.host = host
        self.port = port
        self.with_worker = worker
        self.log = log
        self.env: dict[str, str] = {}
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.redis = None
        self._stop = threading.Event()
        self._copiers: dict[str, threading.Thread] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- setup

    def prepare(self) -> None:
        """Everything before the first child: env, database schema, the tiny model, Redis."""
        if not _port_free(self.host, self.port):
            raise TuneqError(f"port {self.port} on {self.host} is in use; stop what runs there or pass --port")
        private_home(self.home)
        env = dict(os.environ)
        env["TUNEQ_HOME"] = str(self.home)
        env.setdefault("TUNEQ_DATABASE_URL", f"sqlite:///{self.home / 'tuneq.db'}")
        env["PYTHONUNBUFFERED"] = "1"
        # Children import api/, worker/ and trainer/ from the same checkout as this process,
        # installed or not, whatever the current directory.
        source_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
        self.env = env

        self.log(f"database: migrating {env['TUNEQ_DATABASE_URL']}")
        from core.migrate import upgrade_head

        upgrade_head(env["TUNEQ_DATABASE_URL"])
        self._first_admin_key(env["TUNEQ_DATABASE_URL"])

        models = self.home / "models"
        tiny = models / TINY_MODEL
        if not (tiny / "config.json").is_file():
            self.log(f"model: building {TINY_MODEL} into {tiny}")
            built = subprocess.run([sys.executable, "-m", "trainer", "tiny", str(tiny)], env=env,
                                   capture_output=True, text=True)
            if built.returncode != 0:
                last = (built.stderr or built.stdout).strip().splitlines()[-1:] or ["no output"]
                raise TuneqError(f"building the tiny model failed: {last[0]}")
        env.setdefault("TUNEQ_MODEL_ROOTS", json.dumps([str(models)]))

        if env.get("TUNEQ_REDIS_URL"):
            if not _redis_answers(env["TUNEQ_REDIS_URL"]):
                raise TuneqError(f"TUNEQ_REDIS_URL={env['TUNEQ_REDIS_URL']} does not answer; unset it to use an embedded Redis")
            self.log(f"redis: using {env['TUNEQ_REDIS_URL']}")
        else:
            self.redis = _detached_redis(self.home / "redis")
            try:
                env["TUNEQ_REDIS_URL"] = self.redis.start()
            except RuntimeError as exc:
                raise TuneqError(str(exc)) from None
            self.log(f"redis: embedded at {self.redis.safe_url} (password in {self.redis.workdir / 'password'})")

    @property
    def admin_key_path(self) -> Path:
        return self.home / "admin.key"

    def _first_admin_key(self, url: str) -> None:
        """On a database without an admin, create one and show its key once (also in admin.key, 0600)."""
        from sqlalchemy.orm import Session

        from core.db import make_engine
        from core.identity import bootstrap_admin

        engine = make_engine(url)
        try:
            with Session(engine) as db:
                token = bootstrap_admin(db)
                db.commit()
        finally:
            engine.dispose()
        if token is None:
            where = f"in {self.admin_key_path}" if self.admin_key_path.is_file() else "not stored here"
            self.log(f"auth: an admin exists (its first key is {where}); more keys: `tuneq admin create-key NAME`")
            return
        # Created 0600 from the start: there is no moment when others could read it.
        fd = os.open(self.admin_key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(self.admin_key_path, 0o600)
        self.log(f"auth: created user 'admin'; its API key, shown once (also in {self.admin_key_path}, mode 0600):\n  {token}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_path = self.home / "logs" / f"{name}.log"
        proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        copier = threading.Thread(target=copy_rotated, args=(proc.stdout, log_path), name=f"{name}-log", daemon=True)
        copier.start()
        self._copiers[name] = copier
        self.children.append((name, proc, log_path))
        self.log(f"{name}: pid {proc.pid}, log {log_path}")

    def _tail_of(self, name: str, log_path: Path) -> str:
        """The last lines of a child that exited, once its copier has written what it printed."""
        copier = self._copiers.get(name)
        if copier is not None:
            copier.join(5)
        return _tail(log_path)

    def start(self) -> None:
        from api.server import PROTOCOL

        self._spawn("api", [sys.executable, "-m", "uvicorn", "api.main:app", "--host", self.host, "--port", str(self.port),
                            "--http", PROTOCOL])
        if self.with_worker:
            self._spawn("worker", [sys.executable, "-m", "worker"])
            # Chat completions (`tuneq chat`, the dashboard's Try it): on the CPU, beside the worker.
            self._spawn("serve", [sys.executable, "-m", "worker.serve"])
        self._wait_healthy()
        if self.redis is not None and not self._stop.is_set():
            self._resend_queued()

    def _resend_queued(self) -> None:
        """A new embedded Redis holds no messages: send again the jobs the database still has queued.

        A job sent twice is harmless, since the database lease lets only one delivery run it.
        """
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("TUNEQ_")})
        from sqlalchemy import select

        from core import db, queue, settings
        from core.models import Job

        settings.get_settings.cache_clear()
        db.get_engine.cache_clear()
        db.get_sessionmaker.cache_clear()
        queue.producer.cache_clear()
        with db.session_scope() as session:
            ids = list(session.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.created_at)))
        for job_id in ids:
            queue.enqueue_job(job_id)
        if ids:
            self.log(f"queue: sent {len(ids)} waiting job(s) to the new Redis")

    def _wait_ready(self, began: float) -> None:
        """Until GET /readyz says a job created now waits on no warm-up: the API's, its checking
        child's, and the worker's standby trainers' imports; then say so, and how long it took."""
        query = "?workers=1" if self.with_worker else ""
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting: object = None
        while not self._stop.is_set():
            if any(proc.poll() is not None for _, proc, _ in self.children):
                return  # wait() says which and why
            try:
                r = httpx.get(f"{self.url}/readyz{query}", timeout=5)
                if r.status_code == 200:
                    api_s = r.json().get("api_warmup_s")
                    self.log(f"tuneq is ready: {time.monotonic() - began:.1f} s after start"
                             + (f" (the API's own warm-up {api_s:.1f} s)" if api_s is not None else "")
                             + "; a job submitted now waits on no warm-up")
                    return
                waiting = r.json().get("waiting_on")
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.log(f"not ready after {READY_TIMEOUT_S:.0f} s (waiting on {waiting}); jobs are taken, but their "
                         "start may wait on the warm-ups")
                return
            time.sleep(0.25)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            for name, proc, log_path in self.children:
                if proc.poll() is not None:
                    raise TuneqError(f"{name} exited with code {proc.returncode} while starting; see {log_path}:\n{self._tail_of(name, log_path)}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        if not self._stop.is_set():
            raise TuneqError(f"the API did not become healthy within {HEALTH_TIMEOUT_S:.0f}s; see {self.home / 'logs'}")

    # -- running and stopping

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stop.set()

    def wait(self) -> int:
        """Until a signal (0) or a child that dies on its own (1)."""
        while not self._stop.wait(0.5):
            for name, proc, log_path in self.children:
                if proc.poll() is not None:
                    self.log(f"{name} exited with code {proc.returncode}; stopping. Last lines of {log_path}:\n{self._tail_of(name, log_path)}")
                    return 1
        return 0

    def stop(self) -> None:
        # Worker first: it must not pick up work while the API goes away, and it needs time
        # to stop its trainers; then the API; Redis last, so the worker can ack on its way out.
        for name, proc, _ in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(WORKER_GRACE_S if name == "worker" else API_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.log(f"{name} did not stop in time; killing it")
                    proc.kill()
                    proc.wait(5)
            self.log(f"{name}: stopped")
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
            self.log("redis: stopped")

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        began = time.monotonic()
        try:
            self.prepare()
            if self._stop.is_set():
                return 0
            self.start()
            if self._stop.is_set():
                return 0
            self.log(f"tuneq is up at {self.url}  (models: {', '.join(self._models())}; Ctrl-C stops it)")
            self.log(f"dashboard: {self.url}/ui  (paste an API key into it)")
            self._wait_ready(began)
            return self.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _models(self) -> list[str]:
        try:
            key = self.admin_key_path.read_text().strip()
            r = httpx.get(f"{self.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            return [m["id"] for m in r.json()["data"] if not m["id"].startswith("ft:")]  # the base models
        except (OSError, httpx.HTTPError, ValueError, KeyError):
            return []
