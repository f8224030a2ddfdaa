"""Queue order decisions and per-GPU lock files, without services."""

from __future__ import annotations

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
