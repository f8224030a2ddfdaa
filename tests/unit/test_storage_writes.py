"""Concurrent writers of one stored key each write through a temporary file of their own."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.storage import write_hashed


class SlowStream(io.RawIOBase):
    """Bytes in small pieces with a pause, so that writers of the same key overlap."""

    def __init__(self, data: bytes, start: threading.Barrier):
        self.data, self.start, self.pos = data, start, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.pos == 0:
            self.start.wait()
        time.sleep(0.01)
        chunk = self.data[self.pos : self.pos + 64]
        self.pos += len(chunk)
        return chunk


def test_writers_of_one_key_at_once_all_succeed_and_leave_one_whole_file(tmp_path: Path) -> None:
    dest = tmp_path / "report.json"
    data = b"x" * 640
    writers = 8
    start = threading.Barrier(writers)
    with ThreadPoolExecutor(writers) as pool:
        results = list(pool.map(lambda _: write_hashed(SlowStream(data, start), dest), range(writers)))
    assert all(size == len(data) for size, _ in results)
    assert dest.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary file left
