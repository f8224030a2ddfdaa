"""`python -m trainer standby --template`: one process that imports the trainer once and forks a
trainer process for each job it is handed (worker/template.py is the worker's side).

A standby (trainer.standby) pays the imports once per job, only earlier; the template pays them
once per worker. Forking is only sound while nothing in the process holds state that a child
cannot inherit:

- CUDA. A child of a process that initialised CUDA cannot use it. So the template imports what a
  run imports with bitsandbytes hidden (trainer.startup.skip_unused_libraries; it asks CUDA for
  the devices' compute capability at import), and before each fork checks that neither torch nor
  anything else initialised the CUDA driver (cuda_driver_initialised). The child's
  CUDA_VISIBLE_DEVICES is its job's: nothing read it yet. Jobs that need bitsandbytes are not
  handed to the template.
- Threads. A fork copies only the forking thread: a lock another thread held stays locked in the
  child. The template runs no thread of its own (it watches its worker from its loop, not with
  trainer.watchdog's thread) and checks before each fork that it is alone in /proc/self/task, but
  for threads of libraries that survive a fork by design (FORK_SAFE_THREADS).
  numpy's OpenBLAS starts a pool at import: the template keeps it at one thread (the trainer's
  compute is torch's, not numpy's).

Protocol, one JSON object a line. The template writes {"ready": IMPORT_S} once it imported (or
{"error": ...} and ends). The worker writes jobs, as a standby takes them plus an id:

    {"id": N, "argv": ["run", SPEC, "--out", DIR, ...], "env": {...}, "cwd": DIR, "log": DIR/trainer.log}

and the template answers {"id": N, "pid": PID} or {"id": N, "error": WHY} (then the worker
starts the trainer fresh). The child does what a standby does once its job arrived (trainer.
standby.take_job), in a session of its own, and runs the trainer; its exit code is the trainer's.
The template stays its parent: it reaps it and writes {"exit": PID, "code": CODE} (CODE as
subprocess.Popen.returncode has it: negative for a signal).

Lifetime: the end of its input (the worker let it go) stops the forks; the template ends once its
children have. The worker's death ends it at once (it polls the worker's pid) and each child dies
with it (PR_SET_PDEATHSIG), besides its own watchdog on the worker.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any

from trainer.watchdog import alive, supervisor_pid

POLL_S = 1.0
SETTLE_WAIT_S = 10.0  # for a child to take its own session (a fork's first microseconds)
PR_SET_PDEATHSIG = 1
CUDA_ERROR_NOT_INITIALIZED = 3
# Threads whose library makes its own state whole again in a forked child: jemalloc (a library
# linked with it, loaded by peft's imports on a CUDA host, starts its purging thread) takes its locks
# around fork and a child simply runs without the thread.
FORK_SAFE_THREADS = frozenset({"jemalloc_bg_thd"})
# What a run of a job the template takes never imports (see the module's docstring).
HIDDEN = ("boto3", "bitsandbytes")


def fork_hazard() -> str | None:
    """Why a fork now would give a broken child, or None."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "torch initialised CUDA"
    if sys.modules.get("bitsandbytes") is not None:
        return "bitsandbytes is imported"
    # A device count or is_available initialises the driver (cuInit) without torch counting CUDA
    # as initialised, and a child of a process that did cannot use the GPU.
    if cuda_driver_initialised():
        return "the CUDA driver is initialised"
    others = [name for name in thread_names()[1:] if name not in FORK_SAFE_THREADS]
    if others:
        return f"the template runs threads besides its own: {', '.join(sorted(others))}"
    return None


def thread_names() -> list[str]:
    """This process's threads by name, the main thread first."""
    tasks = sorted(os.listdir("/proc/self/task"), key=lambda t: t != str(os.getpid()))
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass  # it ended meanwhile
    return names


def cuda_driver_initialised() -> bool:
    """Whether this process initialised the CUDA driver. Loaded is not initialised: a CUDA build
    of torch links the driver library at import, and a child forked after that uses the GPU. Every
    driver call but cuInit answers CUDA_ERROR_NOT_INITIALIZED until cuInit ran, without running
    it, so asking for the device count tells, and changes nothing."""
    with open("/proc/self/maps") as maps:
        path = next((line.split(maxsplit=5)[5].strip() for line in maps
                     if "/libcuda.so" in line and len(line.split(maxsplit=5)) == 6), None)
    if path is None:
        return False  # nothing loaded the driver, so nothing initialised it
    driver = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)  # the loaded one; never loads
    count = ctypes.c_int(0)
    return driver.cuDeviceGetCount(ctypes.byref(count)) != CUDA_ERROR_NOT_INITIALIZED


class Template:
    def __init__(self, control: int) -> None:
        self.control = control  # the worker reads our answers here
        self.children: set[int] = set()
        self.imported_s = 0.0
        self.ready_at = 0.0
        self.wake_r, self.wake_w = os.pipe()

    def say(self, **message: Any) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self.control, data):]

    def import_all(self) -> None:
        from trainer import startup
        from trainer.standby import preload

        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before numpy's import; see the docstring
        startup.hide_libraries(list(HIDDEN))
        began = startup.process_started()
        preload(liger=False)  # the children import liger, which initialises CUDA (trainer.standby.preload)
        gc.freeze()  # the children's collections then leave the shared pages alone
        self.ready_at = time.time()
        self.imported_s = self.ready_at - began

    def serve(self) -> int:
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # the wake-up byte ends the select
        worker = supervisor_pid()
        pending = b""
        reading = True
        while True:
            if worker is not None and not alive(worker):
                return 0  # the children die with us (PR_SET_PDEATHSIG) and by their own watchdog
            self.reap()
            if not reading and not self.children:
                return 0
            ready = select.select([0, self.wake_r] if reading else [self.wake_r], [], [], POLL_S)[0]
            if self.wake_r in ready:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            if 0 in ready:
                data = os.read(0, 1 << 16)
                if not data:
                    reading = False  # no more jobs; the running ones end first
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        self.start(json.loads(line))

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.say(exit=pid, code=os.waitstatus_to_exitcode(status))

    def start(self, job: dict[str, Any]) -> None:
        if (hazard := fork_hazard()) is not None:
            self.say(id=job["id"], error=hazard)
            return
        received = time.time()
        settled_r, settled_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(settled_r)
            os.close(settled_w)
            self.say(id=job["id"], error=f"fork failed: {exc}")
            return
        if pid == 0:
            code = 1
            try:
                os.close(settled_r)
                code = self.child(job, received, settled_w)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - as an uncaught exception ends `python -m trainer`
                traceback.print_exc()
            finally:
                os._exit(finish(code))
        self.children.add(pid)
        # Answer once the child leads its own process group: the worker signals it by that group.
        os.close(settled_w)
        settled = select.select([settled_r], [], [], SETTLE_WAIT_S)[0] and os.read(settled_r, 1) == b"1"
        os.close(settled_r)
        if not settled:
            os.kill(pid, signal.SIGKILL)  # reaped and reported like any child; the worker never knew it
            self.say(id=job["id"], error="the forked trainer did not settle")
            return
        self.say(id=job["id"], pid=pid)

    def child(self, job: dict[str, Any], received: float, settled: int) -> int:
        """In the forked process: leave the template behind and become the job's trainer."""
        parent = os.getppid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in (self.wake_r, self.wake_w, self.control):
            os.close(fd)
        os.setsid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            return 1  # the template died before the death signal was armed
        os.write(settled, b"1")
        os.close(settled)
        from trainer import startup
        from trainer.standby import take_job

        argv = take_job(job)
        startup.from_standby(received, imported_s=self.imported_s, idle_s=received - self.ready_at, forked=True)
        from trainer.cli import main as trainer_main

        return trainer_main(argv)


def finish(code: int) -> int:
    """What the interpreter does on its way out after `sys.exit(code)`: wait for the threads that
    are not daemons, run the exit handlers, flush the output."""
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the exit code stands
        pass
    return code & 0xFF if code >= 0 else 1


def main() -> int:
    control = os.dup(1)
    os.dup2(2, 1)  # a library's print must not reach the worker's channel
    template = Template(control)
    try:
        template.import_all()
    except BaseException as exc:  # noqa: BLE001 - told to the worker, which starts trainers fresh
        template.say(error=f"import failed: {type(exc).__name__}: {exc}"[:500])
        return 1
    if (hazard := fork_hazard()) is not None:
        template.say(error=hazard)
        return 1
    template.say(ready=round(template.imported_s, 3))
    return template.serve()
