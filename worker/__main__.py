"""`python -m worker [--gpus N] [--slots N]`: one worker process on the `tuneq` queue.

--gpus overrides the GPUs found on the host (TUNEQ_GPUS; a configured count also lets a CPU
machine act as a GPU host in tests). Slots (Celery threads) default to the GPUs plus one: a job
holds a slot while it runs, and the spare one lets a waiting higher-priority job's message be
looked at, and preempt, while every GPU is busy. A CPU host runs slots - 1 jobs at once.
"""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a tuneq GPU worker.")
    parser.add_argument("--slots", type=int, default=None, help="Celery threads (default: GPUs + 1, or 2 on a CPU host).")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs of this host (default: detected).")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None, help="Celery node name (default: celery@host).")
    args = parser.parse_args(argv)
    if args.gpus is not None:
        os.environ["TUNEQ_GPUS"] = str(args.gpus)
    if args.slots is None:
        from core.settings import get_settings
        from worker.gpus import detect_gpus

        configured = get_settings().gpus
        args.slots = max(1, configured if configured is not None else detect_gpus()) + 1

    from worker.app import app

    # Threads, not prefork: a job is a supervisor loop around a trainer subprocess, so the slot
    # spends its time waiting, and Celery's warm shutdown can let each slot stop its trainer.
    # No gossip, mingle or event heartbeats: the database decides who runs what, and Celery's
    # gossip crashes the consumer when Redis restarts (AttributeError on reconnect, celery 5.7).
    worker_args = ["worker", "-Q", "tuneq", "--pool", "threads", "--concurrency", str(args.slots),
                   "--loglevel", args.loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat"]
    if args.hostname:
        worker_args += ["--hostname", args.hostname]
    app.worker_main(worker_args)


if __name__ == "__main__":
    main()
