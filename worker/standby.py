"""Standby trainers: processes started ahead of a job that have already imported the trainer.

A worker keeps up to `standby_trainers` of them (trainer.standby). A one-process job hands its
command, environment, directory and log to one instead of starting a fresh interpreter, which
saves the imports (seconds) on the way to the first step. The worker supervises it like any
trainer: it runs in a session of its own (its pid is its process group), carries the worker's pid
for its watchdog and for the orphan scan, and sits in the job's directory once it took the job.

A standby is used only when the job's environment differs from the one it was started with in
variables the trainer reads at run time (ENV_READ_AT_RUN); anything else (a library's setting,
read at import) gets a fresh process. Pools refill after a job reached its first step or ended,
so that a standby's imports do not compete with a starting job for the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from core.settings import Settings
from trainer.standby import READY, TAINTED
from trainer.watchdog import SUPERVISOR_ENV
from worker.workdir import trainer_env

log = logging.getLogger(__name__)

# Variables a job may set differently from its standby's: CUDA reads these at its first use, the
# trainer reads its own at run time.
ENV_READ_AT_RUN = ("CUDA_VISIBLE_DEVICES", "TUNEQ_", "RANK", "LOCAL_RANK", "WORLD_SIZE")
READY_WAIT_S = 60.0  # how long a job waits for a standby still importing before starting fresh


def standby_argv() -> list[str]:
    return [sys.executable, "-m", "trainer", "standby"]


def runtime_only(before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether `after` differs from `before` only in variables read at run time."""
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return all(k.startswith(ENV_READ_AT_RUN) for k in changed)


class Standby:
    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = env
        self.popen = subprocess.Popen(standby_argv(), cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self.spawned = time.time()
        self.ready = self.tainted = False

    def wait_ready(self, timeout: float) -> bool:
        """True once the standby said READY; False if it died, said anything else, or is still
        importing after `timeout`."""
        if self.ready:
            return self.popen.poll() is None
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return False
        line = self.popen.stdout.readline().decode(errors="replace").strip()
        self.ready = line == READY and self.popen.poll() is None
        self.tainted = line == TAINTED
        if not self.ready:
            log.warning("standby trainer %s did not start (%r, exit %s)", self.popen.pid, line, self.popen.poll())
        return self.ready

    def hand(self, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> bool:
        """Give the standby its job; False if it cannot take it (then it is let go)."""
        job = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log_path)}
        assert self.popen.stdin is not None and self.popen.stdout is not None
        try:
            self.popen.stdin.write(json.dumps(job).encode() + b"\n")
            self.popen.stdin.close()
        except (BrokenPipeError, OSError):
            self.close()
            return False
        self.popen.stdout.close()
        return True

    def close(self) -> None:
        """Let an unused standby go: it ends on its closed input; killed if it does not."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class StandbyPool:
    """The worker's standby trainers. Off until start() (a real worker process): code that runs
    jobs in-process, as tests do, starts fresh trainers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[Standby] = []
        self.target = 0
        self.root: Path | None = None

    def start(self, settings: Settings) -> None:
        with self.lock:
            self.target = settings.standby_trainers
            self.root = settings.resolved_work_dir()
        self.refill(settings)

    def env(self, settings: Settings) -> dict[str, str]:
        return {**trainer_env(settings), SUPERVISOR_ENV: str(os.getpid())}

    def refill(self, settings: Settings) -> None:
        with self.lock:
            self.idle = [s for s in self.idle if s.popen.poll() is None]
            if self.root is None:
                return
            self.root.mkdir(parents=True, exist_ok=True)
            while len(self.idle) < self.target:
                self.idle.append(Standby(self.env(settings), self.root))

    def take(self, env: dict[str, str], argv: list[str], cwd: Path, log_path: Path) -> subprocess.Popen | None:
        """A standby running the job (argv after `-m trainer`), or None: start it fresh."""
        with self.lock:
            standby = self.idle.pop(0) if self.idle else None
        if standby is None:
            return None
        if not runtime_only(standby.env, env):
            log.info("job environment differs from the standby's beyond run-time settings; starting a fresh trainer")
            standby.close()
            return None
        if not standby.wait_ready(READY_WAIT_S) or not standby.hand(argv, env, cwd, log_path):
            standby.close()
            if standby.tainted:
                log.warning("a standby trainer found CUDA initialised by its imports; standby trainers are off")
                with self.lock:
                    self.target = 0
            return None
        return standby.popen

    def close(self) -> None:
        with self.lock:
            idle, self.idle, self.target = self.idle, [], 0
        for s in idle:
            s.close()


POOL = StandbyPool()
