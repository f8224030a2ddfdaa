"""A step's tokens/s is timed by the device's clock, not by when the host got round to reading it.

On a GPU the loop reads step n only after queueing step n+1, and queueing can wait for the GPU;
the last step is read at once after the one before it. Timed by the host's read times, the last
step seemed to take almost nothing (a job reported 209,580 tokens/s and MFU 1.43 for it). These
tests stand in a clock-keeping event for CUDA's, so they run on a CPU.
"""

from __future__ import annotations

import torch

from trainer.step import Window
from trainer.step_values import LateRead
from trainer.throughput import ModelFlops, mfu


class _Event:
    """A recorded device event that ended at `t` seconds on the device's clock."""

    def __init__(self, t: float) -> None:
        self.t = t

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, later: "_Event") -> float:
        return (later.t - self.t) * 1000.0  # milliseconds, as torch.cuda.Event's


def _step(done_on_device: float, read_by_host: float) -> LateRead:
    values = LateRead(torch.tensor([1.0]))
    values._done = _Event(done_on_device)
    values.ready_at = read_by_host
    return values


def test_the_last_step_is_timed_by_when_the_device_finished_it() -> None:
    # Each step takes 0.30 s of device time. The host read step 9 late (it had to queue step 10
    # first, which waited on the device until 100.55), and step 10 right after.
    step9, step10 = _step(100.30, read_by_host=100.55), _step(100.60, read_by_host=100.56)
    tokens = 16_384
    window = Window(started=step9.ready_at, input_tokens=tokens, rows=8)
    seconds = step10.seconds_since(step9)
    assert abs(seconds - 0.30) < 1e-9
    assert abs(window.tokens_per_second(step10.ready_at, seconds) - tokens / 0.30) < 1e-6

    # A model whose rate of 16,384 tokens in 0.30 s is 60 % of the peak: it must read 0.6, not
    # the 18.0 the host's 0.01 s would give.
    flops = ModelFlops(matmul_weights=10**9, trainable_matmul_weights=0, layers=0, attention_width=0)
    peak = flops.per_token(2048) * tokens / 0.30 / 0.6
    got = mfu(flops, window.tokens_per_second(step10.ready_at, seconds), 2048, peak)
    assert abs(got - 0.6) < 1e-9


def test_without_device_timing_the_hosts_clock_is_used() -> None:
    # On a CPU a step's values are final when queued: no event, the host's time is exact.
    a, b = LateRead(torch.tensor([1.0])), LateRead(torch.tensor([2.0]))
    assert b.seconds_since(a) is None and b.seconds_since(None) is None
    window = Window(started=10.0, input_tokens=100)
    assert window.tokens_per_second(12.0, None) == 50.0
