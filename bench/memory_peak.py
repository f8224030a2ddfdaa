"""What is allocated at the peak of one training step, by the code that allocated it.

Set TUNEQ_BENCH_MEMORY_DIR and the throughput bench records one extra step of each tuneq and
Unsloth row with torch's CUDA allocator history (after the timed steps, so their times and peaks
are untouched), replays the trace to the moment the step's allocated bytes were highest, and
writes `<dir>/<row>.md`: the bytes held from before the step, and the step's own live blocks at
that moment, grouped by the Python frames that allocated them. It answers "where do the last
0.15 GiB go" with a measurement instead of an estimate.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

ENV = "TUNEQ_BENCH_MEMORY_DIR"
GiB = 2**30
# Frames of these files say nothing about which part of the model allocated a block.
PLUMBING = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/autograd/", "torch/_tensor.py",
            "torch/utils/checkpoint.py", "accelerate/utils/operations.py", "torch/_dynamo/", "<frozen", "functools.py",
            "torch/amp/")


def wanted() -> Path | None:
    path = os.environ.get(ENV)
    return Path(path) if path else None


class PeakRecorder:
    def __init__(self) -> None:
        import torch

        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=500_000)

    def write(self, path: Path, title: str) -> None:
        import torch

        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(summarize(trace, self.baseline, title))


def _where(frames: list[dict[str, Any]]) -> str:
    useful = [f for f in frames if not any(p in f["filename"] for p in PLUMBING)]
    return " < ".join(f"{_short(f['filename'])}:{f['line']} {f['name']}" for f in useful[:3]) or "(no Python frame)"


def _short(filename: str) -> str:
    for marker in (str(Path(__file__).resolve().parents[1]) + "/", "site-packages/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def summarize(trace: list[dict[str, Any]], baseline: int, title: str) -> str:
    live: dict[int, tuple[int, str]] = {}
    freed_from_before = 0
    current = peak = baseline
    at_peak: dict[int, tuple[int, str]] = {}
    freed_at_peak = 0
    for ev in trace:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _where(ev.get("frames") or []))
            current += size
            if current > peak:
                peak, at_peak, freed_at_peak = current, dict(live), freed_from_before
        elif action == "free_completed":
            if addr in live:
                current -= live.pop(addr)[0]
            else:
                freed_from_before += size
                current -= size
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, where in at_peak.values():
        groups[where][0] += size
        groups[where][1] += 1
    lines = [f"# Memory at the peak of one step: {title}", "",
             f"Peak allocated in the recorded step: {peak / GiB:.3f} GiB = {baseline / GiB:.3f} GiB held before the "
             f"step (weights, optimizer state, caches) - {freed_at_peak / GiB:.3f} GiB of it freed by then + "
             f"{sum(s for s, _ in at_peak.values()) / GiB:.3f} GiB allocated in the step and live at the peak.", "",
             "| GiB | blocks | allocated at (innermost useful frames) |", "|---|---|---|"]
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"| {size / GiB:.3f} | {count} | {where} |")
    return "\n".join(lines) + "\n"
