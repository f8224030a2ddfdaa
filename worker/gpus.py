"""This host's GPUs and who holds them: one lock file per GPU, taken with flock.

flock is exclusive across every worker process of the host (and between threads of one, since
each reservation opens its own file), and the kernel drops it when the holder dies, so a
SIGKILLed worker never leaves a GPU reserved. The file's text names the job, so a worker can see
what runs on the host when it looks for a job to preempt.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings


def detect_gpus() -> int:
    """GPUs of this host: nvidia-smi, else torch (slower to import), else 0."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install means no usable GPU
        return 0


@dataclass
class Reservation:
    indices: list[int]
    files: list = field(default_factory=list, repr=False)

    def env(self, kind: str) -> dict[str, str]:
        # On a CPU host the "devices" are job slots, and there is nothing to make visible.
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, self.indices))} if kind == "gpu" else {}


class GpuPool:
    def __init__(self, count: int, lock_dir: Path, kind: str = "gpu", host: str | None = None):
        self.count = count
        self.kind = kind
        self.host = host or socket.gethostname()
        self.lock_dir = lock_dir
        lock_dir.mkdir(parents=True, exist_ok=True)
        # Serialises this process's own probing and reserving; other processes meet at flock.
        self.mutex = threading.RLock()

    @classmethod
    def for_host(cls, settings: Settings, slots: int = 1) -> GpuPool:
        count = settings.gpus if settings.gpus is not None else detect_gpus()
        kind = "gpu"
        if count == 0:
            count, kind = max(1, slots), "cpu"
        lock_dir = settings.gpu_lock_dir or settings.home / "gpu-locks"
        return cls(count, lock_dir.resolve(), kind, settings.host_id or None)

    def _path(self, i: int) -> Path:
        return self.lock_dir / f"{self.kind}{i}.lock"

    def _try(self, i: int):  # noqa: ANN202
        f = open(self._path(i), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return None
        return f

    def reserve(self, k: int, owner: str) -> Reservation | None:
        """k free GPUs, locked until release(); None when fewer than k are free."""
        with self.mutex:
            got: list[tuple[int, object]] = []
            for i in range(self.count):
                if len(got) == k:
                    break
                if (f := self._try(i)) is not None:
                    got.append((i, f))
            if len(got) < k:
                for _, f in got:
                    f.close()
                return None
            for _, f in got:
                f.seek(0)
                f.truncate()
                f.write(owner)
                f.flush()
            return Reservation([i for i, _ in got], [f for _, f in got])

    def release(self, r: Reservation) -> None:
        with self.mutex:
            for f in r.files:
                try:
                    f.truncate(0)
                    f.close()  # closing the last descriptor drops the flock
                except OSError:
                    pass
            r.files.clear()

    def free(self) -> int:
        with self.mutex:
            n = 0
            for i in range(self.count):
                if (f := self._try(i)) is not None:
                    f.close()
                    n += 1
            return n

    def holders(self) -> dict[int, str]:
        """GPU index -> the job holding it, for GPUs held now (by any process of this host)."""
        held = {}
        with self.mutex:
            for i in range(self.count):
                if (f := self._try(i)) is not None:
                    f.close()
                    continue
                try:
                    text = self._path(i).read_text().strip()
                except OSError:
                    text = ""
                if text:
                    held[i] = text
        return held


_pool: GpuPool | None = None
_pool_lock = threading.Lock()


def configure(pool: GpuPool) -> None:
    global _pool
    _pool = pool


def get_pool(settings: Settings) -> GpuPool:
    """The process's pool; a worker sets it at start, a direct caller gets one for its settings."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool.lock_dir != (settings.gpu_lock_dir or settings.home / "gpu-locks").resolve():
            _pool = GpuPool.for_host(settings)
        return _pool
