"""bench/host_sampler.py: a job's slow steps, found in its step trace and joined with what ran then."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from host_sampler import HostSampler, extra_samples, slow_steps, step_columns  # noqa: E402


def _rows(n: int, slow: dict[int, float]) -> list[dict]:
    """n steps of 0.30 s on the GPU, queued 0.30 s apart; `slow`: step -> idle gap before it."""
    return [{"step": i, "at": 100.0 + 0.3 * i, "queue_s": 0.05, "read_s": 0.25, "gc": [[2, 0.09]] if i in slow else [],
             "gpu_gap_s": slow.get(i, 0.0), "gpu_s": 0.30} for i in range(1, n + 1)]


def test_a_step_the_gpu_waited_for_is_slow_and_names_what_ran_then() -> None:
    rows = _rows(40, {20: 0.12, 31: 0.02})
    at20 = rows[19]["at"]
    samples = {"gpu": [{"at": at20, "clocks.sm": 1980.0, "power.draw": 400.0, "reasons": "0x0"}],
               "cpu": [{"at": at20, "busy": {"77": 0.9, "78": 0.1}}],
               "names": {"77": "python -m worker.standby", "78": "redis-server *:6379"}}
    median, slow = slow_steps(rows, samples, left_out=[21])
    assert abs(median - 0.30) < 1e-9
    # 0.30 / 0.42 = 0.71 is slow; 0.30 / 0.32 = 0.94 is not.
    assert [s["step"] for s in slow] == [20]
    s = slow[0]
    assert s["steal"] is None and s["preempted"] == []  # a run from before they were sampled
    assert abs(s["share"] - 0.30 / 0.42) < 1e-9 and s["gc"] == [[2, 0.09]] and s["sm_mhz"] == 1980.0
    assert s["top_cpu"][0][0] == "worker.standby [77]" and abs(s["top_cpu"][0][1] - 0.9) < 1e-9


def test_left_out_and_early_steps_are_not_steady() -> None:
    rows = _rows(12, {3: 1.0, 9: 1.0})
    assert slow_steps(rows, {}, left_out=[9])[1] == []
    assert step_columns(rows, left_out=[9])["gc_passes"] == 0


def test_the_sampler_sees_a_busy_process() -> None:
    import subprocess
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with HostSampler() as sampler:
            time.sleep(2.0)
    finally:
        busy.kill()
        busy.wait()
    shares = [c["busy"].get(busy.pid, 0.0) for c in sampler.cpu]
    # Under a busy test suite the loop may get well under a whole CPU; it is still the one to see.
    assert len(sampler.cpu) >= 3 and max(shares) > 0.15
    assert all(0.0 <= c["steal"] <= 1.0 for c in sampler.cpu)
    # The busy process's main thread is counted (from its second busy sample on).
    assert any(busy.pid in c["preempted"] for c in sampler.cpu)
    assert "while True" in sampler.names[busy.pid]


def test_a_hot_spot_stands_out_and_a_uniform_slowdown_does_not() -> None:
    normal = {"[MainThread] launch": 50.0, "[watch] sleep": 50.0}
    uniform = [["[MainThread] launch", 60], ["[watch] sleep", 60]]
    assert all(abs(n) < 1e-9 for _, n in extra_samples(uniform, normal))
    hot = [["[MainThread] launch", 50], ["[MainThread] compile", 20], ["[watch] sleep", 60]]
    where, n = extra_samples(hot, normal)[0]
    assert where == "[MainThread] compile" and n == 20


def test_held_steps_are_not_steady_and_report_the_hosts_own_time() -> None:
    rows = _rows(40, {30: 1.0, 31: 1.0})  # the hold's sleep shows as the GPU's gap before those steps
    for r in rows:
        r["queue_cpu_s"] = r["queue_s"]
    for r in rows[29:31]:
        r.update(held_ms=1000.0, queue_s=0.21, queue_cpu_s=0.2, host_s={"forward_backward": 0.19})
    assert slow_steps(rows, {}, left_out=[])[1] == []  # not slow: held
    columns = step_columns(rows, left_out=[])
    assert columns["queue_s"] == 0.05 and columns["queue_cpu_s"] == 0.05
    held = columns["held"]
    assert held["steps"] == [30, 31] and held["hold_ms"] == 1000.0
    assert held["queue_s"] == 0.21 and held["queue_cpu_s"] == 0.2 and held["host_s"] == {"forward_backward": 0.19}
    assert abs(held["ahead_s"] - (1.0 + 0.30 - 0.21)) < 1e-9  # the lead gained: the sleep and the step, less the queueing
    assert step_columns(rows[:20], left_out=[])["held"] is None
