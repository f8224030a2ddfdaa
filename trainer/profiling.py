"""Optional torch.profiler capture of a few training steps, for finding where a GPU step's time goes.

TUNEQ_PROFILE_STEPS="a:b" runs steps a..b-1 (1-based, as the metrics count them) under
torch.profiler; TUNEQ_PROFILE_DIR names the folder where every rank writes profile-rank{r}.txt:
the operators sorted by self CUDA time and by self CPU time, and the wall time of each profiled
step. Off by default; when off, `region` hands back one shared null context, so the loop pays
nothing but a function call and no record_function is created.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

STEPS_ENV = "TUNEQ_PROFILE_STEPS"
DIR_ENV = "TUNEQ_PROFILE_DIR"
ROWS = 30

_OFF = nullcontext()
_active: StepProfiler | None = None


def region(name: str) -> AbstractContextManager[Any]:
    """A labelled range in the profile while one is being recorded, else nothing."""
    if _active is None or _active.profile is None:
        return _OFF
    return torch.profiler.record_function(name)


def parse_steps(raw: str) -> tuple[int, int] | None:
    """"a:b" -> (a, b); anything else (empty, malformed, empty range) -> None: no profiling."""
    try:
        a, b = (int(x) for x in raw.split(":"))
    except ValueError:
        return None
    return (a, b) if 0 < a < b else None


class StepProfiler:
    """Starts the profiler before step a and writes the tables after step b-1 (or at close)."""

    def __init__(self, steps: tuple[int, int], out_dir: Path, rank: int, device: torch.device) -> None:
        self.first, self.end = steps
        self.path = Path(out_dir) / f"profile-rank{rank}.txt"
        self.cuda = device.type == "cuda"
        self.profile: Any = None
        self.walls: list[tuple[int, float]] = []
        self._t0 = 0.0

    def before_step(self, step: int) -> None:
        """step: the 1-based number of the step about to be queued."""
        if step == self.first and self.profile is None:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profile = profile(activities=activities)
            self.profile.__enter__()
        if self.profile is not None:
            self._t0 = time.perf_counter()

    def after_step(self, step: int) -> None:
        if self.profile is None:
            return
        self.walls.append((step, time.perf_counter() - self._t0))
        if step + 1 >= self.end:
            self.close()

    def close(self) -> None:
        if self.profile is None:
            return
        if self.cuda:
            torch.cuda.synchronize()  # the profiled kernels' times are complete only once they ran
        self.profile.__exit__(None, None, None)
        averages = self.profile.key_averages()
        self.profile = None
        cuda_key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        lines = [f"steps {self.first}..{self.end - 1} (host wall time per step; the GPU may run behind it)"]
        lines += [f"step {s}: {w * 1000:.1f} ms" for s, w in self.walls]
        lines += ["", "by self CUDA time:" if self.cuda else "by self CPU time (no CUDA):",
                  averages.table(sort_by=cuda_key, row_limit=ROWS),
                  "", "by self CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=ROWS)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")


def from_env(rank: int, device: torch.device) -> StepProfiler | None:
    """The profiler the environment asks for (and makes `region` label ranges), or None."""
    global _active
    steps = parse_steps(os.environ.get(STEPS_ENV, ""))
    folder = os.environ.get(DIR_ENV, "")
    _active = StepProfiler(steps, Path(folder), rank, device) if steps and folder else None
    return _active


def stop() -> None:
    """Write what was recorded (a run that ended inside the range) and forget the profiler."""
    global _active
    if _active is not None:
        _active.close()
    _active = None
