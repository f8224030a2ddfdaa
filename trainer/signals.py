"""Cancel and pause arrive as signals to the trainer's process group (see docs/internals.md).

SIGTERM (cancel) raises at once wherever the trainer is, so it stops promptly even while loading
a model. SIGUSR1 (pause) only sets a flag: a checkpoint is only resumable exactly at an optimizer
step boundary, so the loop finishes the current step, saves, and then stops.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from trainer.errors import Cancelled


class StopFlags:
    def __init__(self) -> None:
        self.pause_requested = False


@contextmanager
def handle_signals(flags: StopFlags) -> Iterator[StopFlags]:
    if threading.current_thread() is not threading.main_thread():
        yield flags  # signal handlers can only be set from the main thread (e.g. inside a test runner)
        return

    def on_term(signum: int, frame: object) -> None:
        raise Cancelled()

    def on_usr1(signum: int, frame: object) -> None:
        flags.pause_requested = True

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_usr1)
    try:
        yield flags
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
