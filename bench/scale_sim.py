"""A cluster of 100 simulated hosts and 10,000 jobs, scheduled by tuneq's own code.

    .venv/bin/python bench/scale_sim.py [--jobs 10000] [--hosts 100] [--seed 1] [--out FILE]

What is real: the database (a SQLite file, migrated by alembic), the queue order with fair
share (core/scheduling.py, core/fairshare.py), the worker's choice and GPU reservation
(worker/placement.py `take`, with a real GpuPool of lock files per host in a temporary folder),
the lease (core/jobs.py acquire_lease, heartbeat, lock_leased_job) and the state machine, which
records each job's GPU use.

What is simulated: the trainer (a job runs for a drawn duration, then succeeds), the clock (a
virtual one, advanced from event to event; tuneq's `now` is pointed at it), the broker (a freed
host's worker runs `take` at once, as when its slot picks the next message) and lease renewals
(every TICK virtual seconds rather than every heartbeat_s). Each `take` is timed in real wall time:
that is the dispatch latency reported, and the GPUs stay idle for that long in virtual time too.
No preemption: all jobs have priority 0.

GPU memory: each job's `min_gpu_memory_gib` is its drawn per-GPU need (what admission records from
its plan), and each host's GpuPool is built by `GpuPool.for_host` from the settings a real worker
of that host would have (TUNEQ_GPUS, TUNEQ_GPU_MEMORY_GIB, TUNEQ_HOST_ID), so `take` checks the fit
itself (core/scheduling.py `Waiting.fits`).

Users: 4 teams of 5; in each team one heavy user queues 1,000 jobs (of 10,000) before anyone
else, the four others 375 each, queued after them, interleaved.

Shares are measured over two windows, both from the start: A, until the first user has no job
queued at all; B, until the first user has no queued job that fits every host (1 GPU, within the
smallest GPU memory). In B every GPU that comes free could go to any user, so B's shares are the
scheduler's; late in A, a user whose queued jobs are all big can use only the few hosts they fit,
and the others get the rest whatever the order says.

    .venv/bin/python bench/scale_sim.py --jobs 0 --small 1000   # the 1,000-job runs and the cost table only
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_MEM_GIB = (24, 48, 80, 141)
HOST_GPUS = (1, 2, 4, 8)
JOB_GPUS = (1, 1, 1, 2, 2, 4, 8)
JOB_MEM_GIB = ((16, 0.4), (40, 0.3), (70, 0.2), (120, 0.1))  # per GPU, with its share of jobs
TICK = 7200.0  # virtual seconds between lease renewals of every running job (they charge GPU use)
EPOCH = 1_800_000_000.0
TEAMS, USERS_PER_TEAM = 4, 5

# The database and the lock files live in memory where the machine has /dev/shm: on a shared
# disk, fsyncs and lock-file writes, not the scheduler, would set the pace.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") else None
FIT = ("tuneq's own (`take` with each host's GpuPool memory from TUNEQ_GPU_MEMORY_GIB, each job's "
       "`min_gpu_memory_gib`)")


SETTINGS: dict[str, float] = {}  # the scheduling settings of the last run, for the report


@dataclass
class Host:
    name: str
    gpus: int
    mem: int
    pool: object = None
    busy_s: float = 0.0  # GPU-seconds of jobs, clipped later


@dataclass
class SimJob:
    id: str
    user: str
    team: str
    gpus: int
    mem: int
    duration: float
    created: float
    start: float | None = None
    end: float | None = None
    host: int | None = None


@dataclass
class Run:
    jobs: dict[str, SimJob]
    hosts: list[Host]
    latencies: list[float] = field(default_factory=list)
    latency_at_depth: list[tuple[int, float]] = field(default_factory=list)
    heartbeats: int = 0
    wall_s: float = 0.0
    makespan_h: float = 0.0


class Clock:
    t = EPOCH

    @classmethod
    def now(cls) -> float:
        return cls.t


def point_now_at_virtual_clock() -> None:
    import core.jobs
    import core.models
    import core.progress
    import core.retries
    import core.scheduling
    import core.states
    import worker.placement

    for mod in (core.models, core.states, core.jobs, core.scheduling, core.retries, core.progress, worker.placement):
        mod.now = Clock.now


def make_hosts(n: int, rng: random.Random) -> list[Host]:
    hosts = [Host(f"host{i:03d}", rng.choice(HOST_GPUS), rng.choice(GPU_MEM_GIB)) for i in range(n)]
    hosts[0].gpus, hosts[0].mem = 8, 141  # the largest job must fit somewhere
    return hosts


def make_jobs(n: int, hosts: list[Host], rng: random.Random) -> dict[str, SimJob]:
    users = [(f"t{t}u{u}", f"t{t}") for t in range(TEAMS) for u in range(USERS_PER_TEAM)]
    heavy = [u for u in users if u[0].endswith("u0")]
    light = [u for u in users if not u[0].endswith("u0")]
    per_heavy = n // 10
    per_light = (n - per_heavy * len(heavy)) // len(light)
    owners = [u for u in heavy for _ in range(per_heavy)]
    rest = [u for u in light for _ in range(per_light)]
    rng.shuffle(owners)
    rng.shuffle(rest)
    owners += rest
    owners += [light[i % len(light)] for i in range(n - len(owners))]
    jobs = {}
    for i, (user, team) in enumerate(owners):
        while True:
            gpus = rng.choice(JOB_GPUS)
            mem = rng.choices([m for m, _ in JOB_MEM_GIB], [w for _, w in JOB_MEM_GIB])[0]
            if any(h.gpus >= gpus and h.mem >= mem for h in hosts):
                break
        hours = min(12.0, max(5 / 60, rng.lognormvariate(0.0, 0.8)))  # median 1 h
        jid = f"ftjob-sim{i:05d}"
        jobs[jid] = SimJob(jid, user, team, gpus, mem, hours * 3600, EPOCH + i * 0.01)
    return jobs


def setup_db(tmp: Path, fair: bool, jobs: dict[str, SimJob]) -> None:
    from sqlalchemy import event, insert

    from core import db as coredb
    from core import settings as coresettings
    from core.migrate import upgrade_head
    from core.models import File, Job, Team, User

    url = f"sqlite:///{tmp / 'sim.db'}"
    # Leases are renewed every TICK here, so they may live that long (a shorter TTL would call
    # every host dead between renewals).
    os.environ.update(TUNEQ_HOME=str(tmp / "home"), TUNEQ_DATABASE_URL=url, TUNEQ_FAIR_SHARE=str(fair).lower(),
                      TUNEQ_MIN_FREE_DISK_GIB="0", TUNEQ_LEASE_TTL_S=str(3 * TICK))
    coresettings.get_settings.cache_clear()
    coredb.get_engine.cache_clear()
    coredb.get_sessionmaker.cache_clear()
    upgrade_head(url)
    # The simulation commits ~4 times per job; on this shared disk each fsync would dominate.
    event.listen(coredb.get_engine(), "connect", lambda conn, _r: conn.execute("PRAGMA synchronous=OFF"))
    coredb.get_engine().dispose()
    with coredb.session_scope() as s:
        teams = sorted({j.team for j in jobs.values()})
        s.execute(insert(Team), [{"id": t, "name": t} for t in teams])
        s.execute(insert(User), [{"id": u, "name": u, "team_id": u[:2]} for u in sorted({j.user for j in jobs.values()})])
        s.execute(insert(File), [{"id": "file-sim", "filename": "t.jsonl", "storage_key": "files/t", "created_at": EPOCH}])
        s.execute(insert(Job), [{
            "id": j.id, "owner_id": j.user, "status": "queued", "model": "sim", "method": "lora", "spec": {},
            "training_file": "file-sim", "priority": 0, "gpus": j.gpus, "progress": {}, "metrics": {},
            "created_at": j.created, "min_gpu_memory_gib": float(j.mem),
        } for j in jobs.values()])


def simulate(n_jobs: int, n_hosts: int, seed: int, fair: bool) -> Run:
    from core import states
    from core.db import get_sessionmaker
    from core.jobs import heartbeat, lock_leased_job
    from core.settings import get_settings
    from worker import placement
    from worker.gpus import GpuPool

    rng = random.Random(seed)
    hosts = make_hosts(n_hosts, rng)
    jobs = make_jobs(n_jobs, hosts, rng)
    tmp = Path(tempfile.mkdtemp(prefix="tuneq-sim-", dir=SCRATCH))
    Clock.t = EPOCH + n_jobs * 0.01
    setup_db(tmp, fair, jobs)
    settings = get_settings()
    SETTINGS.update(half_life=settings.fair_share_half_life_h, job_gpu_hours=settings.fair_share_job_gpu_hours,
                    reserve_after_h=settings.reserve_after_h)
    for h in hosts:  # as a worker started with this host's settings builds its pool
        h.pool = GpuPool.for_host(settings.model_copy(update={
            "gpus": h.gpus, "gpu_memory_gib": float(h.mem), "host_id": h.name, "gpu_lock_dir": tmp / "locks" / h.name}))
        assert h.pool.memory_gib == h.mem and h.pool.kind == "gpu"

    db = get_sessionmaker()()
    run = Run(jobs, hosts)
    queued = set(jobs)
    running: dict[str, tuple[int, object, int]] = {}  # job -> host, reservation, attempt
    ends: list[tuple[float, str]] = []

    def fill(hi: int) -> None:
        h = hosts[hi]
        while queued and h.pool.free() > 0:
            wake = next(iter(queued))  # the message that woke the worker; it runs what fits first
            t0 = time.perf_counter()
            got = placement.take(db, h.pool, wake, f"{h.name}/w", settings)
            dt = time.perf_counter() - t0
            run.latencies.append(dt)
            run.latency_at_depth.append((len(queued), dt))
            if isinstance(got, str):
                return
            job, res = got
            sj = jobs[job.id]
            assert sj.gpus <= h.gpus and sj.mem <= h.mem
            queued.discard(job.id)
            sj.start, sj.host = Clock.t + dt, hi  # the GPUs idle while the decision is made
            sj.end = sj.start + sj.duration
            running[job.id] = (hi, res, job.lease_attempt)
            heapq.heappush(ends, (sj.end, job.id))

    wall0 = time.perf_counter()
    next_tick = Clock.t + TICK
    for hi in range(len(hosts)):
        fill(hi)
    while ends:
        t_end, jid = heapq.heappop(ends)
        while next_tick <= t_end:  # lease renewals charge running jobs' use
            Clock.t = next_tick
            for rid, (hi, _, attempt) in running.items():
                heartbeat(db, rid, f"{hosts[hi].name}/w", attempt)
                run.heartbeats += 1
            next_tick += TICK
        Clock.t = t_end
        hi, res, attempt = running.pop(jid)
        job = lock_leased_job(db, jid, f"{hosts[hi].name}/w", attempt)
        assert job is not None
        states.transition(db, job, states.SUCCEEDED, "Simulated job done.")
        db.commit()
        hosts[hi].pool.release(res)
        fill(hi)
    run.wall_s = time.perf_counter() - wall0
    assert not queued, f"{len(queued)} jobs never ran"
    db.close()
    run.makespan_h = (max(j.end for j in jobs.values()) - EPOCH) / 3600
    return run


# -- measures --------------------------------------------------------------------------------

def busy_fraction(run: Run) -> float:
    """GPU-time used on each host while a job that fits that host (count and memory) still waited."""
    used = total = 0.0
    for hi, h in enumerate(run.hosts):
        fits = [j for j in run.jobs.values() if j.gpus <= h.gpus and j.mem <= h.mem]
        until = max(j.start for j in fits)  # the last fitting job left the queue then
        total += h.gpus * (until - EPOCH)
        used += sum(j.gpus * max(0.0, min(j.end, until) - j.start) for j in run.jobs.values() if j.host == hi)
    return used / total


def shares(run: Run, any_host: bool = False) -> tuple[float, dict[str, float]]:
    """Each user's part of the GPU-hours used from the start until the first user ran out of
    queued jobs: of any job (any_host False), or of jobs that fit every host, i.e. 1 GPU of the
    smallest memory (any_host True). In the second window every GPU that came free could have
    gone to any user; in the first, late in it, some users' queued jobs fit only a few hosts, so
    the others get the rest of the GPUs whatever the scheduler does."""
    smallest = min(h.mem for h in run.hosts)
    last_start = {}
    for j in run.jobs.values():
        if not any_host or (j.gpus == 1 and j.mem <= smallest):
            last_start[j.user] = max(last_start.get(j.user, 0.0), j.start)
    until = min(last_start.values())
    use: dict[str, float] = {}
    for j in run.jobs.values():
        use[j.user] = use.get(j.user, 0.0) + j.gpus * max(0.0, min(j.end, until) - j.start)
    total = sum(use.values())
    return (until - EPOCH) / 3600, {u: use[u] / total if total else 0.0 for u in sorted(use)}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def decision_cost(sizes: list[int], fair: bool, reps: int = 5) -> dict[int, float]:
    """Median wall seconds of one queue ordering + pick with n jobs queued (nothing running)."""
    from core.db import get_sessionmaker
    from core.scheduling import pick, waiting

    out = {}
    for n in sizes:
        rng = random.Random(n)
        hosts = make_hosts(100, rng)
        jobs = make_jobs(n, hosts, rng)
        setup_db(Path(tempfile.mkdtemp(prefix="tuneq-cost-", dir=SCRATCH)), fair, jobs)
        db = get_sessionmaker()()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            pick(waiting(db), free=4, total=8, t=Clock.t, memory_gib=80.0)
            times.append(time.perf_counter() - t0)
            db.rollback()
        db.close()
        out[n] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000, help="jobs of the smaller runs, with and without fair share")
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/scale_sim.md"))
    ap.add_argument("--no-cost", dest="cost", action="store_false", help="leave out the table of one decision's cost")
    args = ap.parse_args()
    import logging

    logging.disable(logging.WARNING)
    point_now_at_virtual_clock()
    load0 = os.getloadavg()[0]
    runs = {}
    for label, n, fair in ((f"{args.jobs:,} jobs, fair share", args.jobs, True), (f"{args.small:,} jobs, FIFO", args.small, False),
                           (f"{args.small:,} jobs, fair share", args.small, True)):
        if n:  # --jobs 0 or --small 0 leaves those runs out
            runs[label] = simulate(n, args.hosts, args.seed, fair)
            print(f"{label}: {runs[label].wall_s:.0f} s wall, load {os.getloadavg()[0]:.1f}", flush=True)
    sizes = sorted({1000, 2500, 5000, 10_000, args.jobs, args.small} - {0})
    cost = {fair: decision_cost(sizes, fair) for fair in (True, False)} if args.cost else {}
    report(args, runs, cost, load0, os.getloadavg()[0])


def report(args, runs: dict[str, Run], cost: dict[bool, dict[int, float]], load0: float, load1: float) -> None:  # noqa: ANN001
    big_label = next(k for k in runs if k.endswith("fair share"))  # the tables of one run below
    big = runs[big_label]
    h = big.hosts
    gpus = sum(x.gpus for x in h)
    fair_user = 1 / (TEAMS * USERS_PER_TEAM)
    lines = [
        "# Scale simulation: placement, leases and fair share at 100 hosts and 10,000 jobs",
        "",
        f"`bench/scale_sim.py --jobs {args.jobs} --small {args.small} --hosts {args.hosts} --seed {args.seed}`: tuneq's "
        "real queue order, `worker/placement.take`, GpuPool lock files, leases and state machine on a **SQLite file "
        "database** (in /dev/shm, synchronous=OFF), with a simulated trainer and a virtual clock. GPU memory fit: "
        + FIT + ".",
        f"Cluster: {len(h)} hosts, {gpus} GPUs ("
        + ", ".join(f"{m} GiB: {sum(x.gpus for x in h if x.mem == m)}" for m in GPU_MEM_GIB)
        + "); hosts of 1/2/4/8 GPUs: " + "/".join(str(sum(1 for x in h if x.gpus == g)) for g in HOST_GPUS) + ".",
        "Jobs: all queued at the start (the 4 heavy users' first), 1-8 GPUs, 16-120 GiB per GPU, durations log-normal "
        "(median 1 h, 5 min to 12 h); priority 0 for all (no preemption); 20 users in 4 teams of 5; "
        f"lease renewals every {TICK / 3600:.0f} virtual hours; settings at their defaults (fair share half-life "
        f"{SETTINGS['half_life']:g} h, {SETTINGS['job_gpu_hours']:g} GPU-hour per GPU ordered ahead, a host reserved "
        f"for a job passed over for {SETTINGS['reserve_after_h']:g} h).",
        f"Machine: 2 cores shared with other work; load average {load0:.1f} at the start, {load1:.1f} at the end.",
        "",
        "| measure | " + " | ".join(runs) + " | target |",
        "|---|" + "---|" * len(runs) + "---|",
    ]

    def row(name: str, f, target: str = "") -> str:  # noqa: ANN001
        return f"| {name} | " + " | ".join(f(r) for r in runs.values()) + f" | {target} |"

    def dev(r: Run, any_host: bool = False) -> str:
        return f"{max(abs(v / fair_user - 1) for v in shares(r, any_host)[1].values()):.1%}"

    lines += [
        row("GPU busy while a job fitting the host waits", lambda r: f"{busy_fraction(r):.1%}", ">= 95 %"),
        row("dispatch latency p50 (one `take`, wall)", lambda r: f"{pct(r.latencies, 50) * 1000:.0f} ms"),
        row("dispatch latency p99", lambda r: f"{pct(r.latencies, 99) * 1000:.0f} ms", "<= 1 s"),
        row("dispatch latency max", lambda r: f"{max(r.latencies) * 1000:.0f} ms"),
        row("`take` calls", lambda r: f"{len(r.latencies)}"),
        row("window A: every user had some job queued", lambda r: f"{shares(r)[0]:.1f} h"),
        row("largest deviation of a user's GPU-hour share from fair (5 %), window A", dev, "<= 10 %"),
        row("window B: every user had a job queued that fits every host (1 GPU, smallest memory)",
            lambda r: f"{shares(r, True)[0]:.1f} h"),
        row("largest deviation of a user's GPU-hour share from fair, window B", lambda r: dev(r, True), "<= 10 %"),
        row("longest wait of any job", lambda r: f"{max(j.start - j.created for j in r.jobs.values()) / 3600:.1f} h"),
        row("all jobs done after (virtual)", lambda r: f"{r.makespan_h:.1f} h"),
        row("real time of the run", lambda r: f"{r.wall_s:.0f} s"),
    ]
    lines += ["", "Each user's share of the GPU-hours used in window A and window B (fair: 5.0 % each):", "",
              "| user | " + " | ".join(f"{k}, {w}" for k in runs for w in "AB") + " |",
              "|---|" + "---|" * (2 * len(runs))]
    sh = [shares(r, b)[1] for r in runs.values() for b in (False, True)]
    lines += [f"| {u} | " + " | ".join(f"{x[u]:.1%}" for x in sh) + " |" for u in sorted(sh[0])]
    lines += ["", f"Waits by job size ({big_label}): a job waits for the backlog ahead of it; "
              "it starves if it still waits once smaller jobs stop coming.", "",
              "| GPUs | jobs | longest wait | last start |", "|---|---|---|---|"]
    for g in sorted({j.gpus for j in big.jobs.values()}):
        js = [j for j in big.jobs.values() if j.gpus == g]
        lines.append(f"| {g} | {len(js)} | {max(j.start - j.created for j in js) / 3600:.1f} h "
                     f"| {(max(j.start for j in js) - EPOCH) / 3600:.1f} h |")
    lines += ["", f"Dispatch latency by queue depth at the decision ({big_label}):", "",
              "| jobs queued | takes | p50 | p99 |", "|---|---|---|---|"]
    for lo, hi in ((0, 1000), (1000, 2500), (2500, 5000), (5000, 10_001)):
        xs = [dt for n, dt in big.latency_at_depth if lo <= n < hi]
        if xs:
            lines.append(f"| {lo}-{hi - 1} | {len(xs)} | {pct(xs, 50) * 1000:.0f} ms | {pct(xs, 99) * 1000:.0f} ms |")
    if not cost:
        text = "\n".join(lines) + "\n"
        print(text)
        Path(args.out).write_text(text)
        return
    lines += ["", "Cost of one scheduling decision (`waiting` + `pick`, nothing running) by queue length, median of 5; "
              "the ratio is against FIFO (fair share off) measured in the same run:", "",
              "| jobs queued | fair share | FIFO | ratio |", "|---|---|---|---|"]
    for n in sorted(cost[True]):
        lines.append(f"| {n} | {cost[True][n] * 1000:.1f} ms | {cost[False][n] * 1000:.1f} ms | {cost[True][n] / cost[False][n]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
