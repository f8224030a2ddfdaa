"""Standby trainers: processes started ahead of a job that have already imported the trainer.

A worker keeps up to `standby_trainers` of them (trainer.standby). A one-process job hands its
command, environment, directory and log to one instead of starting a fresh interpreter, which
saves the imports (seconds) on the way to the first step. The worker supervises it like any
trainer: it runs in a session of its own (its pid is its process group), carries the worker's pid
for its watchdog and for the orphan scan, and sits in the job's directory once it took the job.

Each standby is started for one GPU, with CUDA_VISIBLE_DEVICES set (its imports fix it, see
trainer.standby): for the free GPUs that a reservation takes first (the lowest indices), then
the busy ones, so a one-GPU job normally finds one of its own GPU. A standby is used only when the job's environment
differs from the one it was started with in variables the trainer reads at run time
(ENV_READ_AT_RUN); anything else (its devices, a library's setting read at import) gets a fresh
process. The pool refills once a job ended, and replaces standbys whose GPU got taken. A GPU may keep
two (standby_trainers above the GPU count): a job submitted as the one before it ends takes the
second, which finished importing long before. A job that took a GPU's last standby refills it at
its first step instead (not before: the imports would compete with the job's start), so that the
next job finds one importing. While the GPU still has a standby, the refill waits for the job's
end: its imports take a CPU for about as long as a short job runs, and no job needs it sooner.
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
from collections.abc import Callable
from pathlib import Path

from core.settings import Settings
from trainer.standby import READY
from trainer.watchdog import SUPERVISOR_ENV
from worker.gpus import GpuPool
from worker.workdir import trainer_env

log = logging.getLogger(__name__)

# Variables a job may set differently from its standby's: the trainer reads these at run time (the
# tokenizers library reads its parallelism switch when it tokenizes, and the trainer sets it), or
# never (tensorboardX sets CRC32C_SW_MODE in the worker once the worker first writes curves).
ENV_READ_AT_RUN = ("TUNEQ_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TOKENIZERS_PARALLELISM", "CRC32C_SW_MODE")
DEVICES_ENV = "CUDA_VISIBLE_DEVICES"
READY_WAIT_S = 300.0  # a standby still importing is further along than a fresh process would be


def standby_argv() -> list[str]:
    return [sys.executable, "-m", "trainer", "standby"]


def spawn_piped(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A trainer helper process (a standby, the template): told its jobs on stdin, answering on
    stdout, in a session of its own."""
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def import_time_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The variables in which `after` differs from `before`, other than those read at run time."""
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return sorted(k for k in changed if not k.startswith(ENV_READ_AT_RUN))


def runtime_only(before: dict[str, str], after: dict[str, str]) -> bool:
    return not import_time_changes(before, after)


class Standby:
    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = env
        self.popen = spawn_piped(standby_argv(), env, cwd)
        self.spawned = time.time()
        self.ready = False
        self.failed = False  # it said something else than READY, or ended: never ready

    def wait_ready(self, timeout: float) -> bool | None:
        """True once the standby said READY; False if it died or said anything else; None while it
        is still importing after `timeout`."""
        if self.ready:
            return self.popen.poll() is None
        if self.failed:
            return False
        assert self.popen.stdout is not None
        if not select.select([self.popen.stdout.fileno()], [], [], timeout)[0]:
            return None if self.popen.poll() is None else False
        line = self.popen.stdout.readline().decode(errors="replace").strip()
        self.ready = line == READY and self.popen.poll() is None
        self.failed = not self.ready
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
        self.gpus: GpuPool | None = None

    def start(self, settings: Settings, gpus: GpuPool | None = None) -> None:
        with self.lock:
            self.target = settings.standby_trainers
            self.root = settings.resolved_work_dir()
            self.gpus = gpus if gpus is not None and gpus.kind == "gpu" else None
        self.refill(settings)

    def env(self, settings: Settings, devices: str | None = None) -> dict[str, str]:
        env = {**trainer_env(settings), SUPERVISOR_ENV: str(os.getpid())}
        if devices is not None:
            env[DEVICES_ENV] = devices
        return env

    def wanted(self) -> list[str | None]:
        """The devices the next jobs will get, one entry per standby to keep: the free GPUs in the
        order reserve takes them, then the busy ones (on a host of one GPU, the next job's GPU is
        the one a job holds now)."""
        if self.gpus is None:
            return [None] * self.target
        free = self.gpus.free_device_ids()
        order = free + [d for d in self.gpus.all_device_ids() if d not in free]
        # More standbys than GPUs: a second round, so a GPU's next job finds one while another imports.
        return (order * -(-self.target // max(1, len(order))))[: self.target]

    def state(self) -> dict[str, int]:
        """How many standbys the pool keeps and how many of them are done importing (the worker's
        registry entry: GET /readyz?workers=N waits for them)."""
        with self.lock:
            if self.root is None:
                return {"wanted": 0, "ready": 0}
            ready = sum(1 for s in self.idle if s.wait_ready(0))
            return {"wanted": self.target, "ready": ready}

    def refill(self, settings: Settings, *, only_missing: bool = False) -> None:
        """Start the standbys the pool lacks and close those no longer wanted. only_missing (a job
        just reached its first step): start one only for each device left with no standby at all."""
        with self.lock:
            if self.root is None:
                return
            wanted = self.wanted()
            keep, stale = [], []
            for s in self.idle:
                if s.popen.poll() is not None:
                    continue
                devices = s.env.get(DEVICES_ENV) if self.gpus is not None else None
                if devices in wanted:
                    wanted.remove(devices)
                    keep.append(s)
                else:
                    stale.append(s)  # its GPU is taken now, or fewer are wanted
            if only_missing:
                kept = {s.env.get(DEVICES_ENV) if self.gpus is not None else None for s in keep}
                wanted = [d for d in dict.fromkeys(wanted) if d not in kept]  # one each
            self.root.mkdir(parents=True, exist_ok=True)
            self.idle = keep + [Standby(self.env(settings, d), self.root) for d in wanted]
        for s in stale:
            s.close()

    def take(self, env: dict[str, str], argv: list[str], cwd: Path, log_path: Path,
             give_up: Callable[[], bool] = lambda: False) -> subprocess.Popen | None:
        """A standby running the job (argv after `-m trainer`), or None: start it fresh. A standby
        still importing is waited for (it is further along than a fresh process would be) unless
        `give_up` says the run must stop."""
        with self.lock:
            fits = [s for s in self.idle if runtime_only(s.env, env)]
            standby = fits[0] if fits else None
            if standby is not None:
                self.idle.remove(standby)
        if standby is None:
            if self.idle:
                log.info("no standby trainer for this job's devices and environment (differs in %s); starting a "
                         "fresh trainer", ", ".join(import_time_changes(self.idle[0].env, env)))
            return None
        deadline = time.monotonic() + READY_WAIT_S
        while (ready := standby.wait_ready(0.5)) is None:
            if time.monotonic() >= deadline or give_up():
                # Still importing: it may serve the next job; this one must not wait on (the lease
                # lost, a shutdown: the run has to stop now, not once the imports are done).
                with self.lock:
                    self.idle.append(standby)
                return None
        if not ready or not standby.hand(argv, env, cwd, log_path):
            standby.close()
            return None
        return standby.popen

    def close(self) -> None:
        with self.lock:
            idle, self.idle, self.target = self.idle, [], 0
        for s in idle:
            s.close()


POOL = StandbyPool()
