"""The trainer template: one process per worker that imported the trainer once and forks each
one-process trainer the worker starts (trainer/template.py is its side, and says why forking is
sound there).

A job goes to the template when it is a one-process `python -m trainer run`, its spec needs no
bitsandbytes (trainer.startup.skip_unused_libraries: qlora, its optimizers and a base stored
quantized need it, and the template cannot have imported it), and its environment differs from
the template's only in variables read at run time or in its devices (worker.standby). Any other
job, or a template that is not there (off, ended, refused the fork), gets a standby or a fresh
process as before: TrainerProcess falls back and the log says why.

The forked trainer is the template's child, not the worker's: the template reaps it and writes
its exit status on its output, which a thread here reads into the trainer's handle (Forked, which
has what TrainerProcess uses of subprocess.Popen). A template that ends takes its running children
with it (they die with their parent); their handles then read as killed by SIGKILL, as a trainer
the OOM killer took would, and the jobs are retried.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from trainer.watchdog import SUPERVISOR_ENV, alive
from worker.standby import DEVICES_ENV, READY_WAIT_S, import_time_changes, spawn_piped
from worker.workdir import trainer_env

log = logging.getLogger(__name__)

ANSWER_WAIT_S = 30.0  # a fork takes milliseconds; a template that does not answer is let go
# Templates that end before they are ready, after which this worker starts its trainers fresh.
MAX_FAILED_STARTS = 2


def template_argv() -> list[str]:
    return [sys.executable, "-m", "trainer", "standby", "--template"]


def needs_bitsandbytes(spec_path: Path) -> bool | None:
    """Whether the run of this spec imports bitsandbytes; None if the spec cannot be read here
    (then the fresh trainer reports what is wrong with it)."""
    from trainer.spec import JobSpec
    from trainer.startup import skip_unused_libraries

    try:
        spec = JobSpec.model_validate_json(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return "bitsandbytes" not in skip_unused_libraries(spec, modules={})


class Forked:
    """A trainer forked by the template, as TrainerProcess uses a subprocess.Popen."""

    def __init__(self, pid: int, template: TemplateProcess):
        self.pid = pid
        self.args = template_argv()
        self.returncode: int | None = None
        self.template = template
        self.ended = threading.Event()

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self.ended.set()

    def poll(self) -> int | None:
        if self.returncode is None and self.template.gone.is_set() and not alive(self.pid):
            self.exited(-signal.SIGKILL)  # it died with its template, which could not tell us more
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            self.ended.wait(0.1)
        return code


class TemplateProcess:
    """One template process and the thread that reads what it says."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.env = env
        self.popen = spawn_piped(template_argv(), env, cwd)
        self.ready = threading.Event()
        self.gone = threading.Event()
        self.error: str | None = None
        self.was_ready = False
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.children: dict[int, Forked] = {}
        self.lock = threading.Lock()  # one job at a time on the channel
        self.next_id = 0
        threading.Thread(target=self.read, name=f"trainer-template-{self.popen.pid}", daemon=True).start()

    def read(self) -> None:
        assert self.popen.stdout is not None
        try:
            for raw in self.popen.stdout:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if "exit" in message:
                    child = self.children.pop(message["exit"], None)
                    if child is not None:
                        child.exited(int(message["code"]))
                elif "id" in message:
                    if "pid" in message:
                        # Known before the next line is read, which may be its exit already.
                        message["child"] = self.children[message["pid"]] = Forked(message["pid"], self)
                    self.answers.put(message)
                elif "ready" in message:
                    log.info("trainer template %s ready (imported in %.1f s)", self.popen.pid, message["ready"])
                    self.was_ready = True
                    self.ready.set()
                elif "error" in message:
                    self.error = str(message["error"])
        finally:
            self.gone.set()
            self.ready.set()  # whoever waits for it learns that it is gone
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            log.warning("trainer template %s ended (exit %s%s)", self.popen.pid, self.popen.poll(),
                        f": {self.error}" if self.error else "")

    def fork(self, job: dict[str, Any]) -> Forked | None:
        """The running trainer, or None (the reason logged)."""
        with self.lock:
            if self.gone.is_set():
                return None
            self.next_id += 1
            assert self.popen.stdin is not None
            try:
                self.popen.stdin.write(json.dumps({**job, "id": self.next_id}).encode() + b"\n")
                self.popen.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return None
            try:
                answer = self.answers.get(timeout=ANSWER_WAIT_S)
            except queue.Empty:
                log.warning("trainer template %s did not answer within %.0f s; letting it go", self.popen.pid,
                            ANSWER_WAIT_S)
                self.kill()
                return None
        if "pid" not in answer:
            log.warning("trainer template %s did not fork the trainer: %s", self.popen.pid, answer.get("error"))
            return None
        return answer["child"]

    def close(self) -> None:
        """No more jobs: the template ends once its running trainers have."""
        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class TrainerTemplate:
    """The worker's template. Off until start() (a real worker process with the setting on); the
    process itself starts then, or with the first job that may use it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: TemplateProcess | None = None
        self.root: Path | None = None
        self.env: dict[str, str] = {}
        self.failed_starts = 0

    def start(self, settings: Settings) -> None:
        with self.lock:
            if not settings.trainer_template:
                return
            self.root = settings.resolved_work_dir()
            self.env = {**trainer_env(settings), SUPERVISOR_ENV: str(os.getpid())}
            if settings.trainer_template_at_start:
                self.spawn()

    def spawn(self) -> None:
        assert self.root is not None
        self.root.mkdir(parents=True, exist_ok=True)
        self.current = TemplateProcess(self.env, self.root)

    def state(self) -> str:
        """off (no template, or none started yet), importing, ready, or gone (jobs start another
        way): the worker's registry entry, so that GET /readyz?workers=N waits for its imports."""
        with self.lock:
            cur = self.current
            if self.root is None or cur is None:
                return "off"
            if cur.gone.is_set():
                return "gone"
            return "ready" if cur.ready.is_set() else "importing"

    def running(self) -> TemplateProcess | None:
        """The template, started again if the last one ended after it had been ready."""
        with self.lock:
            if self.root is None:
                return None
            if self.current is None:
                self.spawn()  # not started with the worker: the first job waits for its imports
            cur = self.current
            if cur is not None and cur.gone.is_set():
                # A template that refused before it was ready (a fork hazard: its imports initialised
                # the CUDA driver, or started a thread) would refuse again on this host: do not retry.
                self.failed_starts += 0 if cur.was_ready else MAX_FAILED_STARTS if cur.error else 1
                if self.failed_starts >= MAX_FAILED_STARTS:
                    log.warning("trainer template failed %s times; starting trainers fresh from now on",
                                self.failed_starts)
                    self.root = None
                    return None
                log.info("trainer template %s is gone; starting another for the next jobs", cur.popen.pid)
                self.spawn()
                return None  # this job does not wait for its imports
            return cur

    def take(self, env: dict[str, str], argv: list[str], cwd: Path, log_path: Path,
             give_up: Callable[[], bool] = lambda: False) -> Forked | None:
        """A trainer forked from the template running the job (argv after `-m trainer`), or None:
        start it another way. A template still importing is waited for, as a standby is."""
        if argv[:1] != ["run"] or len(argv) < 2 or self.root is None:
            return None
        # Whether this job may use a template comes first: a template not started yet is started
        # only for one that may (its imports cost seconds of a CPU and a process's memory).
        changed = [k for k in import_time_changes(self.env, env) if k != DEVICES_ENV]
        if changed:
            log.info("the job's environment differs from the trainer template's in %s; starting it another way",
                     ", ".join(changed))
            return None
        if needs_bitsandbytes(Path(cwd) / argv[1]) is not False:
            log.info("the job needs bitsandbytes (or its spec is unreadable here); not forked from the template")
            return None
        template = self.running()
        if template is None:
            if self.root is not None:
                log.info("no trainer template ready; starting a fresh trainer")
            return None
        deadline = time.monotonic() + READY_WAIT_S
        while not template.ready.wait(0.5):
            if time.monotonic() >= deadline or give_up():
                log.info("trainer template %s still importing; starting the trainer another way", template.popen.pid)
                return None
        if template.gone.is_set():
            log.warning("trainer template %s is gone (%s); starting a fresh trainer", template.popen.pid,
                        template.error or "no reason given")
            return None
        return template.fork({"argv": argv, "env": env, "cwd": str(cwd), "log": str(log_path)})

    def close(self) -> None:
        with self.lock:
            cur, self.current, self.root = self.current, None, None
        if cur is not None:
            cur.close()


TEMPLATE = TrainerTemplate()
