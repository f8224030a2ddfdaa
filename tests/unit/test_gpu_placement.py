"""Queue order decisions and per-GPU lock files, without services."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from core.scheduling import Waiting, blocked_head, pick
from worker.gpus import GpuPool

ROOT = Path(__file__).resolve().parents[2]


def w(id: str, gpus: int = 1, priority: int = 0, retry_at: float = 0.0) -> Waiting:
    return Waiting(id, gpus, priority, retry_at)


def test_pick_backfills_around_a_head_that_does_not_fit_and_skips_back_off() -> None:
    queue = [w("big", gpus=4, priority=5), w("later", retry_at=200.0), w("small")]
    assert pick(queue, free=2, total=4, t=100.0).id == "small"
    assert pick(queue, free=4, total=4, t=100.0).id == "big"
    assert pick(queue, free=0, total=4, t=100.0) is None
    assert blocked_head(queue, free=2, total=4, t=100.0).id == "big"
    # A job bigger than the host is neither picked nor a reason to preempt here.
    assert pick([w("huge", gpus=8)], free=4, total=4) is None
    assert blocked_head([w("huge", gpus=8)], free=0, total=4) is None


def test_gpu_locks_are_exclusive_across_processes_and_freed_when_the_holder_dies(tmp_path: Path) -> None:
    pool = GpuPool(3, tmp_path, kind="gpu")
    mine = pool.reserve(2, owner="job-a")
    assert mine is not None and mine.indices == [0, 1] and mine.env("gpu") == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert pool.reserve(2, owner="job-b") is None and pool.free() == 1
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from worker.gpus import GpuPool
        r = GpuPool(3, Path({str(tmp_path)!r})).reserve(1, owner="job-c")
        print(r.indices, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "[2]"
        assert pool.free() == 0 and pool.holders() == {0: "job-a", 1: "job-a", 2: "job-c"}
    finally:
        holder.kill()
        holder.wait()
    assert pool.free() == 1  # the kernel dropped the dead process's lock
    pool.release(mine)
    assert pool.free() == 3 and pool.holders() == {}


def test_a_worker_confined_by_cuda_visible_devices_uses_only_those_gpus(tmp_path: Path, monkeypatch) -> None:
    """nvidia-smi lists every GPU of the host; a worker started with CUDA_VISIBLE_DEVICES=2,3 must
    count two GPUs, give its jobs the ids 2 and 3 (not 0 and 1), and lock them under those ids."""
    from core.settings import Settings
    from worker.gpus import detect_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == 2
    pool = GpuPool.for_host(Settings(home=tmp_path, gpus=None))
    assert (pool.count, pool.kind) == (2, "gpu")
    first, second = pool.reserve(1, "job-a"), pool.reserve(1, "job-b")
    assert first.env("gpu") == {"CUDA_VISIBLE_DEVICES": "2"}
    assert second.env("gpu") == {"CUDA_VISIBLE_DEVICES": "3"}
    assert pool.reserve(1, "job-c") is None
    assert (tmp_path / "gpu-locks" / "gpu2.lock").read_text() == "job-a"

    # Another worker of the host, confined to GPU 3, sees it held; one confined to GPU 1 does not.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert GpuPool.for_host(Settings(home=tmp_path, gpus=None)).free() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert GpuPool.for_host(Settings(home=tmp_path, gpus=None)).free() == 1


def test_cuda_visible_devices_stops_at_an_entry_that_names_no_device(monkeypatch) -> None:
    from worker.gpus import detect_gpus, visible_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")
    assert visible_devices() == ["0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == 0
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_devices() is None


def test_a_host_without_a_gpu_driver_counts_none_without_importing_torch(monkeypatch) -> None:
    """A CPU host's worker learns it has no GPU from the absent driver: torch's import (a second of
    CPU at every worker's start) is only for hosts where a driver could show one."""
    code = ("import os, shutil, sys\n"
            "from worker import gpus\n"
            "shutil.which = lambda name: None\n"  # no nvidia-smi
            "gpus.GPU_DRIVER_PATHS = ('/nonexistent/driver',)\n"
            "print(gpus.detect_gpus(), 'torch' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["0", "False"], out.stderr[-2000:]


def test_a_gpu_driver_is_its_device_files_or_nvidia_smi(monkeypatch, tmp_path: Path) -> None:
    """The kernel warm-up runs only where a driver is: a container given GPUs may show nvidia-smi
    without the device files checked, and a CPU host given job slots (TUNEQ_GPUS) shows neither."""
    from worker import gpus

    monkeypatch.setattr(gpus, "GPU_DRIVER_PATHS", (str(tmp_path / "nvidiactl"),))
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert not gpus.gpu_driver_present()
    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert gpus.gpu_driver_present()
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    (tmp_path / "nvidiactl").touch()
    assert gpus.gpu_driver_present()
