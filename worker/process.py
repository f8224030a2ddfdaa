"""The trainer as a child process group: launch, signal, wait, kill.

The trainer runs in its own session so that signals meant for the worker (Ctrl-C, a warm
shutdown) do not reach it, and so that one killpg reaches every process it spawned
(`accelerate launch` and its child, data-loader workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trainer.signals import PAUSE_FILE
from trainer.watchdog import SUPERVISOR_ENV, alive
from worker.standby import StandbyPool
from worker.template import Forked, TrainerTemplate


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group.

    `accelerate launch` dies on SIGUSR1/SIGTERM before its child does, and an orphaned child's
    zombie may never be reaped in a container whose PID 1 is not an init, so killpg(pgid, 0)
    cannot tell whether the trainer is gone; /proc can.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class TrainerProcess:
    def __init__(self, argv: list[str], *, cwd: Path, log_path: Path, env: dict[str, str],
                 standbys: StandbyPool | None = None, give_up: Callable[[], bool] = lambda: False,
                 template: TrainerTemplate | None = None):
        """Start the trainer; a one-process `python -m trainer ...` is forked from `template` when
        it can take it (worker.template), else goes to a standby trainer of `standbys`
        (worker.standby), else to a fresh process."""
        # The previous run's pause request is not this run's.
        (Path(cwd) / PAUSE_FILE).unlink(missing_ok=True)
        popen: subprocess.Popen | Forked | None = None
        if argv[:3] == [sys.executable, "-m", "trainer"]:
            if template is not None:
                popen = template.take(env, argv[3:], Path(cwd), Path(log_path), give_up)
            if popen is None and standbys is not None:
                popen = standbys.take(env, argv[3:], Path(cwd), Path(log_path), give_up)
        self.forked = isinstance(popen, Forked)
        self.standby = popen is not None
        if popen is None:
            with open(log_path, "ab") as log:
                popen = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        self.popen = popen
        self.pgid = self.popen.pid
        self.work_dir = Path(cwd)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def members(self) -> list[int]:
        """Live processes of the trainer: its process group, and the ranks of a multi-GPU job,
        which torchrun starts each in a session of its own (out of reach of the group)."""
        return sorted(set(group_members(self.pgid)) | set(trainer_pids(self.work_dir)))

    def send(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass
        for pid in trainer_pids(self.work_dir):
            try:
                if os.getpgid(pid) != self.pgid:
                    os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def ask_pause(self) -> None:
        """Ask the trainer to checkpoint and stop: by a file it checks every step, and by SIGUSR1.
        The file still reaches a trainer that the signal does not (see trainer.signals)."""
        (self.work_dir / PAUSE_FILE).touch()
        self.send(signal.SIGUSR1)

    def finished(self) -> bool:
        """True once the launched process has exited and no process of the trainer is left."""
        if self.popen.poll() is None:
            return False
        return not self.members()

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.finished():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Send `sig`, wait up to grace_s for the group to exit, then SIGKILL what is left."""
        self.send(sig)
        if not self.wait(grace_s):
            self.kill()

    def kill(self) -> None:
        self.send(signal.SIGKILL)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.wait(10)


def trainer_pids(work_dir: Path) -> list[int]:
    """Live processes running the trainer on work_dir: `… trainer run … --out work_dir`, or a
    standby trainer (`… trainer standby`), or a trainer forked from the template (its command
    line is the template's, `… trainer standby --template`), that took a job and moved into
    work_dir."""
    target = str(work_dir)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in args]
        if "trainer" not in argv or not alive(int(entry.name)):
            continue
        if ("--out" in argv and target in argv) or ("standby" in argv and _cwd(entry) == target):
            found.append(int(entry.name))
    return found


def _cwd(entry: Path) -> str | None:
    try:
        return os.readlink(entry / "cwd")
    except OSError:
        return None


def kill_strays(work_dir: Path) -> list[int]:
    """SIGKILL trainers of an earlier attempt still writing into work_dir; return their pids.

    A worker killed with SIGKILL leaves its trainer running (it is in its own session), and a
    re-run of the job must not share the directory with it.
    """
    killed = []
    for pid in trainer_pids(work_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def kill_orphans() -> list[int]:
    """SIGKILL the process groups of trainers whose supervising worker is dead; return the pgids.

    A SIGKILLed worker leaves its trainer running in its own session, and the kernel has already
    freed that worker's GPU locks: left alone, the orphan would share a GPU with the next job.
    The trainer's own watchdog (trainer.watchdog) stops it within a second; this catches what
    that misses (a stalled process, a launcher without the watchdog). Each trainer carries its worker's pid in its environment, which tells orphans apart from
    trainers of live workers of the same host.
    """
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"trainer" not in argv:
            continue
        prefix = SUPERVISOR_ENV.encode() + b"="
        sup = next((e[len(prefix):] for e in environ if e.startswith(prefix)), None)
        if sup is None or not sup.isdigit() or alive(int(sup)):
            continue
        try:
            pgid = os.getpgid(int(entry.name))
            os.killpg(pgid, signal.SIGKILL)
            killed.append(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed
