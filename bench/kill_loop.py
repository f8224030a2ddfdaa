"""SIGKILL the worker at random moments while jobs train; count what survives.

    .venv/bin/python bench/kill_loop.py [--kills 12] [--jobs 4] [--gpus 2] [--steps 60] [--seed 0]

Real processes against the machine's PostgreSQL and Redis (a fresh database and Redis db of its
own): `python -m worker --gpus N` is killed with SIGKILL and restarted, again and again. A sampler
looks at /proc every 50 ms for trainer processes per job, the direct check that no job ever ran
twice at once. Writes bench/results/kill_loop.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("TUNEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TUNEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/13"


def live_trainers(work_root: Path) -> dict[str, set[int]]:
    """job id -> pids of live trainer processes writing into its work dir."""
    found: dict[str, set[int]] = defaultdict(set)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state in ("Z", "X") or "trainer" not in argv or "--out" not in argv:
            continue
        out = argv[argv.index("--out") + 1]
        if out.startswith(str(work_root)):
            found[Path(out).name].add(int(entry.name))
    return found


class Sampler(threading.Thread):
    def __init__(self, work_root: Path):
        super().__init__(daemon=True)
        self.work_root, self.stop_flag = work_root, threading.Event()
        self.max_at_once: dict[str, int] = defaultdict(int)
        self.samples = 0

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for job, pids in live_trainers(self.work_root).items():
                self.max_at_once[job] = max(self.max_at_once[job], len(pids))
            self.samples += 1
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--min-gap", type=float, default=4.0, help="Shortest time between a restart and the next kill.")
    ap.add_argument("--max-gap", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/kill_loop.md")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    import redis
    from sqlalchemy import create_engine, text

    tmp = Path(tempfile.mkdtemp(prefix="tuneq-kill-loop-"))
    db_name = f"tuneq_kill_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = PG_ADMIN.rsplit("/", 1)[0] + f"/{db_name}"
    redis.Redis.from_url(REDIS).flushdb()
    env = {
        "TUNEQ_HOME": str(tmp / "home"), "TUNEQ_DATABASE_URL": db_url, "TUNEQ_REDIS_URL": REDIS,
        "TUNEQ_MODEL_ROOTS": json.dumps([str(tmp / "models")]), "TUNEQ_ACCELERATE_LAUNCH": "false",
        "TUNEQ_HEARTBEAT_S": "0.5", "TUNEQ_LEASE_TTL_S": "4", "TUNEQ_DISPATCH_INTERVAL_S": "0.5",
        "TUNEQ_REGISTRY_TTL_S": "5", "TUNEQ_RETRY_BACKOFF_S": "0.5", "TUNEQ_MAX_ATTEMPTS": "100",
    }
    os.environ.update(env)

    from core.migrate import upgrade_head
    from trainer.tiny import build_tiny

    upgrade_head(db_url)
    build_tiny(tmp / "models" / "tiny-llama", seed=0)

    from core import states
    from core.db import session_scope
    from core.models import Job, JobEvent
    from core.queue import enqueue_job
    from tests.integration.conftest import make_job

    with session_scope() as db:
        ids = [make_job(db, str(tmp / "models" / "tiny-llama"), steps=args.steps, examples=64,
                        checkpoint_every=args.checkpoint_every, log_every=1).id for _ in range(args.jobs)]
    for job_id in ids:
        enqueue_job(job_id)

    wenv = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp / "workers.log", "ab")

    def start_worker() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "worker", "--gpus", str(args.gpus), "--loglevel", "INFO"],
                                cwd=ROOT, env=wenv, stdout=log, stderr=subprocess.STDOUT)

    def statuses() -> dict[str, str]:
        with session_scope() as db:
            return {j.id: j.status for j in db.query(Job).filter(Job.id.in_(ids))}

    sampler = Sampler(tmp / "home" / "work")
    sampler.start()
    t0 = time.monotonic()
    worker = start_worker()
    kills: list[dict] = []
    while len(kills) < args.kills and time.monotonic() - t0 < args.timeout:
        time.sleep(rng.uniform(args.min_gap, args.max_gap))
        if all(s in states.TERMINAL for s in statuses().values()):
            break
        running = [k for k, v in statuses().items() if v == states.RUNNING]
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        kills.append({"t": round(time.monotonic() - t0, 1), "running": len(running)})
        print(f"kill {len(kills)} at {kills[-1]['t']} s, {len(running)} jobs running", flush=True)
        worker = start_worker()
    while time.monotonic() - t0 < args.timeout and not all(s in states.TERMINAL for s in statuses().values()):
        time.sleep(1)
    elapsed = time.monotonic() - t0
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
    sampler.stop_flag.set()
    sampler.join()

    # Per job, from the event log in order. A trainer's `start` says which checkpoint it resumed
    # from; every step any earlier trainer of the job reached beyond it is recomputed work. (A
    # killed worker's trainer may run on for a few seconds until the next worker kills it; the
    # steps it reached count, and so do its checkpoints.)
    rows, max_recomputed, overlaps = [], 0, 0
    final = statuses()
    with session_scope() as db:
        for job_id in ids:
            evs = db.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.seq).all()
            runs, running, reached, recomputed, resumed_at = 0, False, 0, [], []
            for e in evs:
                if e.type == "message" and e.data and "pid" in e.data:
                    overlaps += running  # a run began while the previous one had not ended
                    running, runs = True, runs + 1
                elif e.type == "start":
                    r = e.data.get("resumed_from_step") or 0
                    resumed_at.append(r)
                    recomputed.append(max(0, reached - r))
                elif e.type == "metrics":
                    reached = max(reached, e.data.get("step", 0))
                elif e.type == "status" and e.data and e.data.get("from") in ("running", "cancelling"):
                    running = False
            worst = max(recomputed, default=0)
            max_recomputed = max(max_recomputed, worst)
            attempts = db.get(Job, job_id).lease_attempt
            trace = ", ".join(f"{r} (+{c})" for r, c in zip(resumed_at, recomputed))
            rows.append((job_id, final[job_id], runs, attempts, worst, sampler.max_at_once.get(job_id, 0), trace))
    finished = sum(1 for r in rows if r[1] == states.SUCCEEDED)
    twice = sum(1 for r in rows if r[5] > 1) + overlaps

    lines = [
        "# Kill loop: SIGKILL of the worker at random moments",
        "",
        f"`{' '.join(['bench/kill_loop.py'] + sys.argv[1:])}` on {os.cpu_count()} CPU cores, PostgreSQL + Redis, "
        f"tiny model, {args.jobs} jobs x {args.steps} steps, checkpoint every {args.checkpoint_every} steps, "
        f"{args.gpus} configured GPUs, lease TTL 4 s, kill gaps {args.min_gap}-{args.max_gap} s (seed {args.seed}).",
        "",
        "| result | value |",
        "|---|---|",
        f"| worker SIGKILLs | {len(kills)} (jobs running at the kill: {', '.join(str(k['running']) for k in kills)}) |",
        f"| jobs finished (succeeded) | {finished} of {len(ids)} |",
        f"| most steps recomputed after a kill | {max_recomputed} (checkpoint period {args.checkpoint_every}) |",
        f"| jobs ever run twice at once | {twice} (/proc sampled {sampler.samples} times every 50 ms; event-log overlaps {overlaps}) |",
        f"| wall time | {elapsed:.0f} s |",
        "",
        "| job | status | trainer runs | lease attempts | most steps recomputed | most live trainers at once | trainer starts: resumed from step (+ steps recomputed) |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |" for r in rows],
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    redis.Redis.from_url(REDIS).flushdb()


if __name__ == "__main__":
    main()
