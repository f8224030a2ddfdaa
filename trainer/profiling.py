"""Optional torch.profiler capture of a few training steps, for finding where a GPU step's time goes.

TUNEQ_PROFILE_STEPS="a:b" runs steps a..b-1 (1-based, as the metrics count them) under
torch.profiler; TUNEQ_PROFILE_DIR names the folder where every rank writes profile-rank{r}.txt:
the operators sorted by self CUDA time and by self CPU time, and the wall time of each profiled
step; and profile-rank{r}.json.gz, the timeline (Chrome's trace format), in which each kernel
and the host call that launched it share a correlation id (bench/launch_lead.py reads how far
the host ran ahead of the GPU from it). Off by default; when off, `region` hands back one shared
null context, so the loop pays nothing but a function call and no record_function is created.

TUNEQ_STEP_TRACE_DIR asks for a lighter record of every step (StepTrace), for telling why a step
was slow where the profiler would change the timing it looks for: whether the GPU sat idle
waiting for the host, how long the host took to queue the step and to read the one before, and
the collector's passes that fell inside it.
"""

from __future__ import annotations

import gc
import gzip
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

STEPS_ENV = "TUNEQ_PROFILE_STEPS"
DIR_ENV = "TUNEQ_PROFILE_DIR"
TRACE_ENV = "TUNEQ_STEP_TRACE_DIR"
STACKS_ENV = "TUNEQ_STEP_TRACE_STACKS_MS"
HOLD_ENV = "TUNEQ_STEP_TRACE_HOLD_STEPS"
HOLD_MS = 1000.0  # far more than the lead the host can build on the GPU (the launch queue's worth)
STACK_FRAMES = 3  # innermost frames that name a sample
STACK_ROWS = 12  # a step's most frequent samples kept
ROWS = 30

_OFF = nullcontext()
_active: StepProfiler | None = None
_tracing: StepTrace | None = None


def region(name: str) -> AbstractContextManager[Any]:
    """A labelled range in the profile while one is being recorded; while a step trace is, the
    host's seconds in it are added to the step's row; else nothing."""
    if _active is not None and _active.profile is not None:
        return torch.profiler.record_function(name)
    if _tracing is not None:
        return _tracing.timed(name)
    return _OFF


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
        profile, self.profile = self.profile, None
        averages = profile.key_averages()
        cuda_key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        lines = [f"steps {self.first}..{self.end - 1} (host wall time per step; the GPU may run behind it)"]
        lines += [f"step {s}: {w * 1000:.1f} ms" for s, w in self.walls]
        lines += ["", "by self CUDA time:" if self.cuda else "by self CPU time (no CUDA):",
                  averages.table(sort_by=cuda_key, row_limit=ROWS),
                  "", "by self CPU time:", averages.table(sort_by="self_cpu_time_total", row_limit=ROWS)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(lines) + "\n")
        timeline = self.path.with_suffix(".json")
        profile.export_chrome_trace(str(timeline))
        with open(timeline, "rb") as raw, gzip.open(timeline.with_suffix(".json.gz"), "wb") as packed:
            shutil.copyfileobj(raw, packed)
        timeline.unlink()


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


class StepTrace:
    """Each step's times, written as JSON lines (steps-<pid>-rank<r>.jsonl: a header, then one line
    per step) when the loop ends. On a GPU, two timed events bracket what the host queued for a
    step: `gpu_gap_s` is how long the GPU sat idle between the previous step's end and this step's
    start (the host was late), `gpu_s` how long the step took on the GPU from its start (starved
    mid-step if the host was slow to launch it). `queue_s` is the host's time to queue the step,
    `read_s` its time to read the step before (waiting for the GPU included), and `gc` the
    collector's passes that ran meanwhile, as (generation, seconds). `host_s` splits the host's
    time by the loop's regions (collate, forward_backward and all_reduce inside it, clip, optimizer,
    log); `device_allocs`, `device_frees` and `host_allocs` count the caching allocators' calls to
    the driver (cudaMalloc, cudaFree, which waits for the device, and pinned host memory) during
    the step.

    `queue_cpu_s` is the main thread's CPU time while it queued the step: against `queue_s`, the
    time it was off the CPU (preempted, or waiting for the interpreter's lock or a blocking call).

    TUNEQ_STEP_TRACE_HOLD_STEPS="a:b" holds the GPU busy for HOLD_MS (a sleep kernel) before each of
    steps a..b-1, once the step before has run, so that the host begins such a step with that much
    more lead on the GPU. Where it still has to wait for the GPU (a synchronizing call, or a launch
    into the driver's full queue), `queue_s` holds the rest of the hold, and `gpu_gap_s + gpu_s -
    queue_s` is the lead the host gained over the step: near zero, its lead has a cap it cannot run
    past (the profile's timeline, bench/launch_lead.py, shows how large). Such a row has `held_ms`;
    its GPU gap holds the sleep, and its time is not the job's.

    With TUNEQ_STEP_TRACE_STACKS_MS set, a thread also samples every thread's innermost Python
    frames at that interval, and `stacks` keeps a step's most frequent ones with their counts: what
    the host was busy with when a step ran long. The sampling takes the interpreter's lock each
    time, so it slows the host a little; it is off unless asked for."""

    def __init__(self, folder: Path, rank: int, device: torch.device, header: dict[str, Any]) -> None:
        self.path = Path(folder) / f"steps-{os.getpid()}-rank{rank}.jsonl"
        self.cuda = device.type == "cuda"
        self.header = {"pid": os.getpid(), "rank": rank, "started": time.time(), **header}
        self.steps: list[dict[str, Any]] = []
        self._events: list[tuple[Any, Any]] = []
        self._gc: list[tuple[int, float]] = []
        self._gc_started = 0.0
        self._t0 = self._cpu0 = 0.0
        self._held = 0.0
        self._hold_steps = parse_steps(os.environ.get(HOLD_ENV, "")) if self.cuda else None
        self._hold_cycles = self._cycles_per_ms() * HOLD_MS if self._hold_steps else 0
        self._regions: dict[str, float] = {}
        self._counts = self._allocator_counts()
        self._stacks: Counter[str] = Counter()
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        gc.callbacks.append(self._collected)
        every_ms = float(os.environ.get(STACKS_ENV) or 0)
        if every_ms > 0:
            self._sampler = threading.Thread(target=self._sample, args=(every_ms / 1000,), name="tuneq-step-stacks",
                                             daemon=True)
            self._sampler.start()

    def _sample(self, every_s: float) -> None:
        me = threading.get_ident()
        names = {t.ident: t.name for t in threading.enumerate()}
        while not self._sampling.wait(every_s):
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                where = []
                while frame is not None and len(where) < STACK_FRAMES:
                    where.append(f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}")
                    frame = frame.f_back
                if ident not in names:
                    names = {t.ident: t.name for t in threading.enumerate()}
                self._stacks[f"[{names.get(ident, ident)}] " + " < ".join(where)] += 1

    @staticmethod
    def _cycles_per_ms() -> float:
        """The GPU's sleep kernel counts clock cycles: how many take a millisecond now (one sync,
        before the run's first step)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 50_000_000
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def _allocator_counts(self) -> dict[str, int]:
        if not self.cuda:
            return {}
        device = torch.cuda.memory_stats()
        host = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}
        return {"device_allocs": device.get("num_device_alloc", 0), "device_frees": device.get("num_device_free", 0),
                "host_allocs": host.get("num_host_alloc", 0)}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._regions[name] = self._regions.get(name, 0.0) + time.perf_counter() - started

    def _collected(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self._gc.append((info["generation"], round(time.perf_counter() - self._gc_started, 6)))

    def _event(self) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def begin(self, step: int) -> None:
        """The host starts queueing `step`."""
        self._held = 0.0
        if self._hold_steps and self._hold_steps[0] <= step < self._hold_steps[1]:
            torch.cuda._sleep(int(self._hold_cycles))
            self._held = HOLD_MS
        self._t0, self._cpu0 = time.perf_counter(), time.thread_time()
        self._start = self._event()

    def queued(self, step: int) -> None:
        """The step is queued (not run: on a GPU it may still be waiting for the one before)."""
        now = time.perf_counter()
        row = {"step": step, "at": time.time(), "queue_s": round(now - self._t0, 6),
               "queue_cpu_s": round(time.thread_time() - self._cpu0, 6)}
        if self._held:
            row["held_ms"] = self._held
        self.steps.append(row)
        self._events.append((self._start, self._event()))
        self._t0 = now

    def read(self) -> None:
        """The step before has been read (and logged when due): what the host did after queueing."""
        row = self.steps[-1]
        row["read_s"] = round(time.perf_counter() - self._t0, 6)
        row["gc"], self._gc = self._gc, []
        row["host_s"], self._regions = {k: round(v, 6) for k, v in self._regions.items()}, {}
        stacks, self._stacks = self._stacks, Counter()
        if stacks:
            row["stacks"] = stacks.most_common(STACK_ROWS)
        counts = self._allocator_counts()
        row.update({k: v - self._counts.get(k, 0) for k, v in counts.items()})
        self._counts = counts

    def close(self) -> None:
        global _tracing
        if _tracing is self:
            _tracing = None
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join(5)
        gc.callbacks.remove(self._collected)
        if self.cuda and self._events:
            try:
                torch.cuda.synchronize()  # every event has happened: their times can be read
                previous_end = None
                for row, (start, end) in zip(self.steps, self._events):
                    row["gpu_s"] = start.elapsed_time(end) / 1000.0
                    row["gpu_gap_s"] = previous_end.elapsed_time(start) / 1000.0 if previous_end is not None else None
                    previous_end = end
            except RuntimeError as exc:  # a run that ended in a CUDA error: keep the host's columns, not hide it
                self.header["gpu_columns"] = f"unavailable: {exc}"[:200]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(self.header)] + [json.dumps(row) for row in self.steps]
        self.path.write_text("\n".join(lines) + "\n")


class _NoTrace:
    """What the loop calls when no trace was asked for: nothing."""

    def begin(self, step: int) -> None: ...
    def queued(self, step: int) -> None: ...
    def read(self) -> None: ...
    def close(self) -> None: ...


NO_TRACE = _NoTrace()


def step_trace(rank: int, device: torch.device, header: dict[str, Any]) -> StepTrace | _NoTrace:
    """The step trace the environment asks for (TRACE_ENV names its folder), or one that does
    nothing; while it is open, `region` times the loop's regions into it."""
    global _tracing
    folder = os.environ.get(TRACE_ENV, "")
    _tracing = StepTrace(Path(folder), rank, device, header) if folder else None
    return _tracing or NO_TRACE
