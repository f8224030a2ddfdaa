"""events.jsonl: the trainer's only channel to the worker.

One JSON object per line, written with a single write and flushed at once, so a reader that tails
the file never sees half a line and a killed trainer loses at most the line it was writing.
No fsync: the worker reads through the page cache, and a host crash loses the job anyway.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

Level = Literal["info", "warning", "error"]


def json_safe(value: Any) -> Any:
    # JSON has no NaN/Infinity; a diverged loss must still produce a line the worker can parse.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class EventWriter:
    """Appends events to DIR/events.jsonl; a no-op on every rank but 0.

    `listeners` are called with each event's type and data after it is written (trainer.tracking
    feeds experiment trackers so). Threads may emit: one line is written at a time.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        self._lock = threading.Lock()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the writer

    def emit(self, type: str, message: str = "", level: Level = "info", **data: Any) -> None:
        if not self.enabled:
            return
        line = {"type": type, "time": time.time(), "level": level, "message": message, "data": json_safe(data)}
        with self._lock:
            if self._file is None:  # closed, while a tracker's thread still reports
                return
            self._file.write(json.dumps(line, allow_nan=False) + "\n")
            self._file.flush()
        for listener in self.listeners:
            listener(type, line["data"])

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict]:
    """All complete events of a file (a torn last line is skipped)."""
    events = []
    p = Path(path)
    if not p.exists():
        return events
    for raw in p.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return events
