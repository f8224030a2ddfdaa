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


def visible_devices() -> list[str] | None:
    """The device ids this worker was given in CUDA_VISIBLE_DEVICES; None when it is unset.

    On a shared server an operator confines a worker to some GPUs this way; nvidia-smi ignores
    the variable and lists them all, so the worker must not count or hand out the others. CUDA
    stops reading the list at the first entry that names no device ("-1" hides every GPU).
    """
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    ids: list[str] = []
    for part in raw.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break
        ids.append(part)
    return ids


# Where a host with a GPU driver shows it: NVIDIA's kernel module, AMD's compute device (ROCm).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")


def gpu_driver_present() -> bool:
    """Whether this host has a GPU driver (NVIDIA's or ROCm's device files, or nvidia-smi), asked
    without importing torch."""
    return any(os.path.exists(p) for p in GPU_DRIVER_PATHS) or shutil.which("nvidia-smi") is not None


def detect_gpus() -> int:
    """GPUs of this worker: CUDA_VISIBLE_DEVICES when set, else nvidia-smi, else torch where a
    GPU driver is installed, else 0."""
    visible = visible_devices()
    if visible is not None:
        return len(visible)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            pass
    if not gpu_driver_present():
        return 0  # no GPU driver on this host: importing torch (a second of CPU) would only say so
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken CUDA install means no usable GPU
        return 0


GPU_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]


def parse_gpu_query(text: str, device_ids: list[str] | None = None) -> list[dict[str, object]]:
    """Name and memory (GiB) of each GPU in nvidia-smi's CSV answer, in device_ids order when given
    (a worker confined with CUDA_VISIBLE_DEVICES, by index or UUID)."""
    found: dict[str, dict[str, object]] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        index, uuid, mib = parts[0], parts[1], parts[-1]
        try:
            gpu = {"name": ",".join(parts[2:-1]), "memory_gib": round(float(mib) / 1024, 1)}
        except ValueError:
            continue
        found[index] = found[uuid] = gpu
    if device_ids is None:
        return [g for k, g in found.items() if not k.startswith("GPU-")]
    return [found[d] for d in device_ids if d in found]


def describe_gpus(device_ids: list[str] | None = None) -> list[dict[str, object]]:
    """This worker's GPUs for the registry; [] where nvidia-smi is missing or fails."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(GPU_QUERY, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_gpu_query(out, device_ids)


@dataclass
class Reservation:
    indices: list[int]
    files: list = field(default_factory=list, repr=False)
    # The ids the job sees its GPUs by: the worker's own CUDA_VISIBLE_DEVICES entries, else indices.
    device_ids: list[str] | None = None

    def env(self, kind: str) -> dict[str, str]:
        # On a CPU host the "devices" are job slots, and there is nothing to make visible.
        ids = self.device_ids if self.device_ids is not None else [str(i) for i in self.indices]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids)} if kind == "gpu" else {}


def host_gpu_info(settings: Settings, count: int, kind: str, device_ids: list[str] | None) -> list[dict[str, object]]:
    """Name and memory of each of the worker's `count` devices, as its registry entry reports them.

    TUNEQ_GPU_MEMORY_GIB replaces the detected memory; on a CPU worker it makes each job slot a
    GPU of that size, so that hosts of different sizes can be tried on one machine.
    """
    detected = describe_gpus(device_ids)[:count] if kind == "gpu" else []
    if settings.gpu_memory_gib is None:
        return detected
    name = settings.gpu_name or (str(detected[0]["name"]) if detected else "simulated")
    return [{"name": name, "memory_gib": settings.gpu_memory_gib} for _ in range(count)]


class GpuPool:
    def __init__(self, count: int, lock_dir: Path, kind: str = "gpu", host: str | None = None,
                 device_ids: list[str] | None = None, gpu_info: list[dict[str, object]] | None = None):
        self.count = count
        self.kind = kind
        # Name and memory of each GPU, asked once: what a job's plan is checked against.
        self.gpu_info = gpu_info or []
        # Index i of this pool is the host's GPU device_ids[i]; lock files are named by that id,
        # so workers confined to different GPUs of one host never lock each other's.
        self.device_ids = device_ids[:count] if device_ids is not None else None
        self.host = host or socket.gethostname()
        self.lock_dir = lock_dir
        lock_dir.mkdir(parents=True, exist_ok=True)
        # Serialises this process's own probing and reserving; other processes meet at flock.
        self.mutex = threading.RLock()

    @classmethod
    def for_host(cls, settings: Settings, slots: int = 1) -> GpuPool:
        count = settings.gpus if settings.gpus is not None else detect_gpus()
        kind = "gpu"
        visible = visible_devices()
        if count == 0:
            count, kind, visible = max(1, slots), "cpu", None
        lock_dir = settings.gpu_lock_dir or settings.home / "gpu-locks"
        if visible is not None and len(visible) < count:
            visible = None  # a configured count beyond the visible list: plain indices, as before
        return cls(count, lock_dir.resolve(), kind, settings.host_id or None, device_ids=visible,
                   gpu_info=host_gpu_info(settings, count, kind, visible))

    @property
    def memory_gib(self) -> float | None:
        """Memory of this host's smallest GPU (a job may get any of them); None when unknown."""
        sizes = [float(g["memory_gib"]) for g in self.gpu_info if isinstance(g.get("memory_gib"), int | float)]
        return min(sizes) if sizes else None

    def _path(self, i: int) -> Path:
        return self.lock_dir / f"{self.kind}{self.device_ids[i] if self.device_ids else i}.lock"

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
            indices = [i for i, _ in got]
            ids = [self.device_ids[i] for i in indices] if self.device_ids else None
            return Reservation(indices, [f for _, f in got], ids)

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
        return len(self.free_device_ids())

    def all_device_ids(self) -> list[str]:
        """The CUDA_VISIBLE_DEVICES entry of each GPU of the pool, by index."""
        return [self.device_ids[i] if self.device_ids else str(i) for i in range(self.count)]

    def free_device_ids(self) -> list[str]:
        """The CUDA_VISIBLE_DEVICES entry of each free GPU, lowest index first (the order reserve takes them)."""
        with self.mutex:
            free = []
            for i in range(self.count):
                if (f := self._try(i)) is not None:
                    f.close()
                    free.append(self.all_device_ids()[i])
            return free

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
