"""What the host and the GPU were doing while a job's steps ran, for explaining its slow steps.

`HostSampler` samples, while it is open, the GPU's clocks, power, temperature, utilisation and
clock-limit reasons (nvidia-smi every 100 ms) and every process's CPU time, the host's CPU time
stolen by a hypervisor and the busy processes' involuntary switches (/proc every 200 ms), each
sample stamped with the host's clock. `slow_steps` joins that with a job's step trace (the
trainer's TUNEQ_STEP_TRACE_DIR, trainer.profiling.StepTrace) and lists, for each step slower than
a share of the median, where its time went (the GPU idle waiting for the host, or busy) and what
else ran then.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

GPU_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "utilization.gpu")
REASONS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")  # newer drivers' name first
CPU_EVERY_S = 0.2
# A steady step slower than this share of the median is a stalled one (the run path's target): the
# one rule of every bench that counts such steps.
STALL_SHARE = 0.85
PREEMPT_MIN_BUSY = 0.1  # processes busier than this share of a CPU have their switches counted
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _host_times() -> tuple[float, float]:
    """(all CPU time, the part a hypervisor gave other guests: steal), in ticks, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return float(sum(fields[:8])), float(fields[7]) if len(fields) > 7 else 0.0


def _preempted(pid: int) -> int | None:
    """How often the process's main thread was switched out while it could have run."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_times() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds so far, command name) for every process /proc shows."""
    out: dict[int, tuple[float, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(entry.name)] = ((int(fields[11]) + int(fields[12])) / TICKS, cmd[:120] or name)
    return out


class HostSampler:
    """Samples until closed; `gpu` and `cpu` hold the samples (see the module docstring)."""

    def __init__(self) -> None:
        self.gpu: list[dict] = []
        # {"at", "busy": {pid: CPU share of the interval}, "steal": the host's share stolen by the
        # hypervisor, "preempted": {pid: its main thread's involuntary switches, for busy pids}}
        self.cpu: list[dict] = []
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> HostSampler:
        for reasons in REASONS + (None,):
            query = ",".join(GPU_FIELDS + ((reasons,) if reasons else ()))
            try:
                proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                         "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            except OSError:  # no nvidia-smi: a CPU host
                break
            first = proc.stdout.readline() if proc.stdout else ""
            if first and "," in first and "not a valid field" not in first.lower():
                self._proc, self._fields = proc, GPU_FIELDS + (("reasons",) if reasons else ())
                self._add_gpu(first)
                break
            proc.kill()
            proc.wait()
        for target in ([self._read_gpu] if self._proc else []) + [self._read_cpu]:
            self._threads.append(threading.Thread(target=target, daemon=True))
            self._threads[-1].start()
        return self

    def _add_gpu(self, line: str) -> None:
        values = [v.strip() for v in line.split(",")]
        sample: dict = {"at": time.time()}
        for key, value in zip(self._fields, values):
            try:
                sample[key] = float(value) if key != "reasons" else value
            except ValueError:
                sample[key] = None
        self.gpu.append(sample)

    def _read_gpu(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            self._add_gpu(line)

    def _read_cpu(self) -> None:
        before, then, host = _cpu_times(), time.time(), _host_times()
        switches: dict[int, int] = {}
        while not self._stop.wait(CPU_EVERY_S):
            now_times, now, host_now = _cpu_times(), time.time(), _host_times()
            busy = {pid: (t - before[pid][0]) / (now - then) for pid, (t, _) in now_times.items()
                    if pid in before and t > before[pid][0]}
            self.names.update({pid: name for pid, (_, name) in now_times.items() if pid in busy})
            total = host_now[0] - host[0]
            counts = {pid: n for pid in busy if busy[pid] > PREEMPT_MIN_BUSY and (n := _preempted(pid)) is not None}
            self.cpu.append({"at": now, "busy": busy, "steal": (host_now[1] - host[1]) / total if total else 0.0,
                             "preempted": {pid: n - switches[pid] for pid, n in counts.items() if pid in switches}})
            switches = counts
            before, then, host = now_times, now, host_now

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        for thread in self._threads:
            thread.join(2)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"gpu": self.gpu, "cpu": self.cpu, "names": self.names}))


def read_trace(folder: Path, out_contains: str) -> list[dict] | None:
    """The rank-0 step trace of the job whose output folder contains `out_contains`, or None."""
    for path in sorted(folder.glob("steps-*-rank0.jsonl")):
        header, *rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if out_contains in header.get("out", ""):
            return rows
    return None


def _name(names: dict, pid) -> str:
    """A sampled process as a table cell: "<module or program> [pid]" (pids are strings once the
    samples went through JSON)."""
    return f"{_short(names.get(str(pid)) or names.get(pid) or str(pid))} [{pid}]"


def _short(cmd: str) -> str:
    """A process's command line as a table cell: its module or program and first argument."""
    parts = cmd.split()
    if "-m" in parts and parts.index("-m") + 1 < len(parts):
        i = parts.index("-m")
        return " ".join(parts[i + 1:i + 3])
    return " ".join(Path(p).name if "/" in p else p for p in parts[:2])


def slow_steps(rows: list[dict], samples: dict, left_out: list[int], share: float = STALL_SHARE,
               first: int = 6) -> tuple[float, list[dict]]:
    """(median GPU-clock seconds of the steady steps, one dict per step slower than median/share)."""
    steady = [r for r in rows if r["step"] >= first and r["step"] not in left_out and not r.get("held_ms")]
    if not steady:
        return 0.0, []
    # On a GPU a step's time is the GPU clock's from the previous step's end (the first step has
    # no gap: it is not steady); on a CPU the step runs while the host queues it.
    wall = {r["step"]: (r.get("gpu_gap_s") or 0.0) + r["gpu_s"] if "gpu_s" in r else r["queue_s"] for r in steady}
    median = statistics.median(wall.values())
    at = {r["step"]: r["at"] for r in rows}
    # A normal step's stack samples, on average: what a slow step did more of stands out against it.
    normal: dict[str, float] = {}
    for r in steady:
        for where, n in r.get("stacks") or []:
            normal[where] = normal.get(where, 0.0) + n / len(steady)
    found = []
    for r in steady:
        if wall[r["step"]] <= median / share:
            continue
        # The GPU runs a step between its queueing and the next one's, give or take a step.
        lo, hi = at.get(r["step"] - 1, r["at"] - wall[r["step"]]), at.get(r["step"] + 1, r["at"] + wall[r["step"]])
        gpu = [g for g in samples.get("gpu", []) if lo <= g["at"] <= hi]
        load: dict[str, float] = {}
        cpu = [c for c in samples.get("cpu", []) if lo <= c["at"] <= hi]
        for c in cpu:
            for pid, busy in c["busy"].items():
                name = _name(samples.get("names", {}), pid)
                load[name] = load.get(name, 0.0) + busy / len(cpu)
        found.append({
            "step": r["step"], "share": median / wall[r["step"]],
            "gpu_gap_s": r.get("gpu_gap_s"), "gpu_s": r.get("gpu_s"),
            "queue_s": r["queue_s"], "queue_cpu_s": r.get("queue_cpu_s"), "read_s": r.get("read_s"),
            "gc": r.get("gc") or [],
            "host_s": r.get("host_s") or {},
            "extra_stacks": extra_samples(r.get("stacks") or [], normal),
            "allocs": [r.get(k) for k in ("device_allocs", "device_frees", "host_allocs")],
            "sm_mhz": min((g["clocks.sm"] for g in gpu if g.get("clocks.sm") is not None), default=None),
            "power_w": max((g["power.draw"] for g in gpu if g.get("power.draw") is not None), default=None),
            "reasons": sorted({g.get("reasons") for g in gpu if g.get("reasons")}),
            "top_cpu": sorted(load.items(), key=lambda kv: -kv[1])[:4],
            "steal": max((c["steal"] for c in cpu if "steal" in c), default=None),
            "preempted": _preempted_in(cpu, samples.get("names", {})),
        })
    return median, found


def _preempted_in(cpu: list[dict], names: dict) -> list[tuple[str, int]]:
    """Involuntary switches of the busy processes' main threads over some samples, most first."""
    total: dict[str, int] = {}
    for c in cpu:
        for pid, n in (c.get("preempted") or {}).items():
            total[_name(names, pid)] = total.get(_name(names, pid), 0) + n
    return sorted(total.items(), key=lambda kv: -kv[1])[:2]


def extra_samples(stacks: list, normal: dict[str, float], keep: int = 3) -> list[tuple[str, float]]:
    """The samples a step had more of than a normal step would have had in as long a time: a
    normal step's counts scaled to this step's number of samples, so that a step uniformly slower
    (every thread sampled more often, the idle ones too) shows nothing, and a hot spot shows."""
    total, usual = sum(n for _, n in stacks), sum(normal.values())
    scale = total / usual if usual else 0.0
    excess = [(where, n - normal.get(where, 0.0) * scale) for where, n in stacks]
    return sorted(excess, key=lambda kv: -kv[1])[:keep]


def step_columns(rows: list[dict], left_out: list[int], first: int = 6) -> dict:
    """Medians of the trace's columns over the steady steps: what a normal step looks like; and over
    the held steps (TUNEQ_STEP_TRACE_HOLD_STEPS), the host's own time to queue a step (`held`)."""
    steady = [r for r in rows if r["step"] >= first and r["step"] not in left_out and not r.get("held_ms")]
    held = [r for r in rows if r.get("held_ms")]

    def med(key: str, among: list[dict]) -> float | None:
        values = [r[key] for r in among if r.get(key) is not None]
        return statistics.median(values) if values else None
    regions = sorted({k for r in steady for k in r.get("host_s") or {}})
    host = {k: statistics.median([(r.get("host_s") or {}).get(k, 0.0) for r in steady]) for k in regions}
    # The lead on the GPU the host gained over a held step (trainer.profiling.StepTrace).
    gained = [(r.get("gpu_gap_s") or 0.0) + r["gpu_s"] - r["queue_s"] for r in held if r.get("gpu_s") is not None]
    held_columns = {"steps": [r["step"] for r in held], "hold_ms": held[0]["held_ms"],
                    **{k: med(k, held) for k in ("queue_s", "queue_cpu_s")},
                    "ahead_s": statistics.median(gained) if gained else None,
                    "host_s": {k: statistics.median([(r.get("host_s") or {}).get(k, 0.0) for r in held])
                               for k in sorted({k for r in held for k in r.get("host_s") or {}})}} if held else None
    columns = ("gpu_gap_s", "gpu_s", "queue_s", "queue_cpu_s", "read_s")
    return {k: med(k, steady) for k in columns} | {"host_s": host, "held": held_columns} | {
        "gc_passes": sum(len(r.get("gc") or []) for r in steady),
        "gc_s": sum(s for r in steady for _, s in (r.get("gc") or []))}
