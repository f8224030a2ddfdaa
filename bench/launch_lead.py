"""How far the host runs ahead of the GPU, from a profiled run's timeline.

    python bench/launch_lead.py PROFILE_DIR/profile-rank0.json.gz [--out bench/results/NAME]

The trainer writes the timeline with TUNEQ_PROFILE_STEPS and TUNEQ_PROFILE_DIR (trainer/profiling.py;
bench/service_throughput.py --profile sets both for a job). In it each kernel (and copy) on the
GPU carries the correlation id of the host call that launched it (cudaLaunchKernel and the like).
A kernel's *lead* is how long it waited on the GPU after that call returned: near zero, the GPU
had nothing else to run and waited for the host; large, the host was that far ahead. A GPU that
waits for the host shows as *idle* time between kernels.

Per profiled step, and per host thread that launched (the main thread queues the forward; the
autograd engine's thread the backward and, under checkpointing, the recomputed forward):
kernels, the lead's percentiles, the share of kernels started within 50 us of their launch, and the
GPU's idle time between kernels. Then the host calls that blocked for over a millisecond (waits
for the GPU: a synchronize, a copy to the host, a launch into a full queue), by name.

The profiler adds a few microseconds of host time per operator, so the leads it shows are a
little shorter than an unprofiled run's.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path

STARTED_WITHIN_US = 50.0
BLOCKING_US = 1000.0
HOST_CALLS = ("cuda_runtime", "cuda_driver")  # Triton's kernels are launched through the driver API


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def analyse(events: list[dict]) -> dict:
    """Per step and launching thread: kernels, lead percentiles (ms), share started at once, GPU
    idle ms; and the blocking host calls."""
    complete = [e for e in events if e.get("ph") == "X"]
    launches = {e["args"]["correlation"]: e for e in complete
                if e.get("cat") in HOST_CALLS and "correlation" in (e.get("args") or {})}
    gpu = sorted((e for e in complete if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    # The loop labels each profiled step's host work "ProfilerStep" only under a schedule; tuneq's
    # regions name forward_backward and optimizer. A step is the span from one forward_backward's
    # start to the next one's.
    # (The GPU's copy of a labelled range, "gpu_user_annotation", is on the GPU's clock: left out.)
    starts = sorted(e["ts"] for e in complete if e.get("name") == "forward_backward"
                    and e.get("cat") == "user_annotation")
    bounds = starts + [float("inf")]

    def step_of(ts: float) -> int | None:
        for i in range(len(starts)):
            if bounds[i] <= ts < bounds[i + 1]:
                return i
        return None

    rows: dict[tuple[int, object], dict] = defaultdict(lambda: {"leads": [], "idle_us": 0.0})
    previous_end: float | None = None
    for k in gpu:
        launch = launches.get((k.get("args") or {}).get("correlation"))
        if launch is None:
            continue
        step = step_of(launch["ts"])
        if step is None:
            continue
        row = rows[(step, launch.get("tid"))]
        row["leads"].append(k["ts"] - (launch["ts"] + launch.get("dur", 0.0)))
        if previous_end is not None and k["ts"] > previous_end:
            row["idle_us"] += k["ts"] - previous_end
        previous_end = max(previous_end or 0.0, k["ts"] + k.get("dur", 0.0))
    table = []
    for (step, tid), row in sorted(rows.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        leads = row["leads"]
        table.append({
            "step": step, "thread": tid, "kernels": len(leads),
            "lead_ms": {q: round(_percentile(leads, p) / 1000, 3)
                        for q, p in (("p5", 0.05), ("p50", 0.5), ("p95", 0.95))},
            "started_at_once": round(sum(1 for x in leads if x <= STARTED_WITHIN_US) / len(leads), 3),
            "gpu_idle_ms": round(row["idle_us"] / 1000, 2),
        })
    blocking = Counter()
    blocked_us: dict[str, float] = defaultdict(float)
    for e in complete:
        if e.get("cat") in HOST_CALLS and e.get("dur", 0.0) > BLOCKING_US:
            blocking[e["name"]] += 1
            blocked_us[e["name"]] += e["dur"]
    steps = []
    for i in range(len(starts)):
        in_step = [k for k in gpu if bounds[i] <= k["ts"] < bounds[i + 1]]
        if in_step:
            span = max(k["ts"] + k.get("dur", 0.0) for k in in_step) - min(k["ts"] for k in in_step)
            busy = sum(k.get("dur", 0.0) for k in in_step)
            steps.append({"step": i, "gpu_span_ms": round(span / 1000, 1), "kernel_ms": round(busy / 1000, 1),
                          "kernels": len(in_step)})
    return {"threads": table, "steps": steps,
            "blocking": [{"call": n, "count": c, "ms": round(blocked_us[n] / 1000, 1)}
                         for n, c in blocking.most_common()]}


def report(result: dict, name: str) -> str:
    lines = [f"# How far the host ran ahead of the GPU: {name}", "",
             "From the profiled steps' timeline (bench/launch_lead.py). Lead: how long a kernel waited on the GPU "
             "after the host call that launched it returned; at once: the share of kernels that started within "
             f"{STARTED_WITHIN_US:.0f} us of it (the GPU was waiting for the host); idle: the GPU's time between "
             "kernels. The profiler's own host time shortens the leads a little.", "",
             "| step | host thread | kernels | lead ms p5 / p50 / p95 | at once | GPU idle ms |",
             "|---|---|---|---|---|---|"]
    for r in result["threads"]:
        lead = r["lead_ms"]
        lines.append(f"| {r['step']} | {r['thread']} | {r['kernels']} | {lead['p5']} / {lead['p50']} / {lead['p95']} | "
                     f"{r['started_at_once']:.0%} | {r['gpu_idle_ms']} |")
    lines += ["", "| step | GPU span ms | kernel ms | kernels |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['gpu_span_ms']} | {s['kernel_ms']} | {s['kernels']} |" for s in result["steps"]]
    lines += ["", "Host calls that blocked over 1 ms:", ""]
    lines += [f"- {b['call']}: {b['count']} times, {b['ms']} ms" for b in result["blocking"]] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("timeline", type=Path)
    p.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = p.parse_args()
    result = analyse(load(args.timeline))
    text = report(result, args.timeline.name)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
