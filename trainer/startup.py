"""How long a run took to reach its first step, phase by phase, for the "startup" event.

Phases, each the seconds since the one before: import (from the process's start to the recipe's
setup: the interpreter, torch, transformers, accelerate), data (tokenizer, reading, tokenizing,
packing), load (the model's weights onto the device, the method and fast path applied), prepare
(optimizer, schedule, resume, forgetting baseline) and first_step (until the first optimizer step's
values are read: kernels' first compilation and the allocator's warm-up included). The worker adds
what happens before the process exists (queue, launch).
"""

from __future__ import annotations

import os
import time


def process_started() -> float:
    """When this process began (epoch seconds), from /proc; the import of this module elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


class Phases:
    """Marks the end of each phase; `seconds()` is the time each took, in order."""

    def __init__(self, started: float | None = None) -> None:
        self.started = process_started() if started is None else started
        self._last = self.started
        self._took: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.time()
        self._took[name] = round(max(now - self._last, 0.0), 3)
        self._last = now

    def seconds(self) -> dict[str, float]:
        return dict(self._took)

    def total(self) -> float:
        return round(self._last - self.started, 3)
