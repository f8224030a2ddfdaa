"""Cancel and pause reach the trainer as signals to its process group (see docs/internals.md);
pause also as a file in its work directory.

SIGTERM (cancel) raises at once wherever the trainer is, so it stops promptly even while loading
a model. SIGUSR1 (pause) only sets a flag: a checkpoint is only resumable exactly at an optimizer
step boundary, so the loop finishes the current step, saves, and then stops.

The pause file is the channel that does not depend on signal delivery: on the lent H200 a
trainer under `accelerate launch` went on to its last step after the worker's SIGUSR1 killed the
launcher (the pause was lost, and the job was re-queued only once training had ended). The loop
checks the file once per step; a stat costs microseconds against a step's milliseconds.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.errors import Cancelled

# Written by the worker into the trainer's work directory to ask for a pause; removed by the
# worker before it starts a run (a run must not stop at once for the previous run's request).
PAUSE_FILE = "pause-requested"


class StopFlags:
    def __init__(self, pause_file: Path | None = None) -> None:
        self.signalled = False
        self.pause_file = pause_file

    @property
    def pause_requested(self) -> bool:
        return self.signalled or self.file_requested()

    def file_requested(self) -> bool:
        return self.pause_file is not None and self.pause_file.exists()

    def source(self) -> str:
        """How the pause was asked for, for the trainer's log."""
        return " and ".join(n for n, on in (("SIGUSR1", self.signalled), ("pause file", self.file_requested())) if on)


@contextmanager
def handle_signals(flags: StopFlags) -> Iterator[StopFlags]:
    if threading.current_thread() is not threading.main_thread():
        yield flags  # signal handlers can only be set from the main thread (e.g. inside a test runner)
        return

    def on_term(signum: int, frame: object) -> None:
        raise Cancelled()

    def on_usr1(signum: int, frame: object) -> None:
        flags.signalled = True
        print("trainer: SIGUSR1 received, pausing after this step", file=sys.stderr, flush=True)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    try:
        yield flags
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
