"""A step's scalars, read on the host one step late, so the host never waits for the GPU mid-step.

Reading a CUDA tensor's value (`.tolist()`, `float()`, `.item()`) makes the host wait until the
GPU has run everything queued before it. Done once or twice per step, the GPU runs dry while the
host then prepares and launches the next step's thousands of small kernels. Instead the step's
packed scalars (loss sums, token counts, votes, gradient norm) are copied into pinned host memory
without waiting, an event marks the copy, and the loop reads them only after it has queued the
next step: by then the copy has normally finished, and if not, the GPU still has a whole step
queued while the host waits.

On a CPU the values are simply the tensor; reading late changes nothing there.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class LateRead:
    """A 1-D tensor of a step's values, on its way to the host."""

    def __init__(self, values: torch.Tensor) -> None:
        values = values.detach()
        self._done: Any = None
        # When the step's work was over, for tokens/s: on a CPU the values are final now (the step
        # ran while it was queued); on a GPU, when read() has seen the copy finish.
        self.ready_at = time.time()
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            # Timed: the GPU's own clock says when a step's work ended (see seconds_since).
            self._done = torch.cuda.Event(enable_timing=True)
            self._done.record()
        else:
            self._host = values

    def read(self) -> list[float]:
        if self._done is not None:
            # Not a sync of the stream: waits only for the copy, queued a whole step ago.
            self._done.synchronize()
            self.ready_at = time.time()
        return self._host.tolist()

    def seconds_since(self, earlier: LateRead | None) -> float | None:
        """Seconds between the ends of two read steps' work by the GPU's clock; None on a CPU or
        without an earlier step. The host's read times are no measure: it reads a step only once
        it has queued the next, which may block until the GPU is done with both, so a last step
        read at once would seem to have taken no time at all."""
        if earlier is None or self._done is None or earlier._done is None:
            return None
        return earlier._done.elapsed_time(self._done) / 1000.0


def pinned(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch in page-locked memory when it is bound for a GPU, so that its non-blocking copy
    is truly asynchronous (a copy from pageable memory makes the host wait for the stream)."""
    if device.type != "cuda":
        return batch
    return {k: v.pin_memory() for k, v in batch.items()}


def to_device(t: torch.Tensor, device: Any) -> torch.Tensor:
    """t on `device` without making the host wait (from pinned memory; a no-op for a CPU)."""
    return t.to(device, non_blocking=True)
