"""`python -m worker [--slots N]`: one worker process with N job slots on the `tuneq` queue."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description="Run a tuneq GPU worker.")
    parser.add_argument("--slots", type=int, default=1, help="Jobs run at the same time (default 1).")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", default=None, help="Celery node name (default: celery@host).")
    args = parser.parse_args(argv)

    from worker.app import app

    # Threads, not prefork: a job is a supervisor loop around a trainer subprocess, so the slot
    # spends its time waiting, and Celery's warm shutdown can let each slot stop its trainer.
    worker_args = ["worker", "-Q", "tuneq", "--pool", "threads", "--concurrency", str(args.slots),
                   "--loglevel", args.loglevel]
    if args.hostname:
        worker_args += ["--hostname", args.hostname]
    app.worker_main(worker_args)


if __name__ == "__main__":
    main()
