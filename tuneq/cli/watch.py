"""Following a job: `tuneq watch` (a live bar until it ends) and `tuneq events`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from tuneq.cli.common import client, friendly, out, print_json
from tuneq.cli.render import LiveBar, event_line, print_job
from tuneq.client import APIError, Client, TuneqError

TERMINAL = ("succeeded", "failed", "cancelled")
# `tuneq watch` exits with the job's outcome, so scripts can chain on it.
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}


def follow_events(c: Client, job_id: str, *, after: str | None = None, limit: int = 20, stream: bool = True,
                  poll_s: float = 2.0) -> Iterator[dict[str, Any]]:
    """Yield the job's events oldest first until it ends: from the SSE stream, else by polling.

    A broken stream is reopened after the last event seen (nothing lost, nothing twice); after
    three failures in a row, or on a server without streams, the list is polled instead.
    """
    last, failures = after, 0
    while stream and failures < 3:
        try:
            for ev in c.stream_events(job_id, after=last, limit=limit):
                last, failures = ev["id"], 0
                yield ev
            return
        except APIError as exc:
            if exc.status not in (400, 404, 405, 406) or exc.param in ("after", "Last-Event-ID"):
                raise
            break  # an older server: no stream here
        except TuneqError:
            failures += 1
            time.sleep(min(2.0 * failures, 5.0))
    while True:
        status_now = c.get_job(job_id)["status"]  # before the events: a final status implies its last events
        for ev in c.events_since(job_id, last, limit):
            last = ev["id"]
            yield ev
        if status_now in TERMINAL:
            return
        time.sleep(poll_s)


def _shown(ev: dict[str, Any]) -> bool:
    """Events worth a line above the bar: everything but the per-step metrics."""
    return ev.get("type") != "metrics"  # OpenAI's own type: a step's metrics or not


def _finish_watch(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job), flush=True)
    else:
        out.print()
        print_job(job)
        if job["status"] == "succeeded":
            out.print(f"download it with `tuneq download {job['id']} DIR`", highlight=False)
    code = EXIT_CODES.get(job["status"], 1)
    if code:
        raise typer.Exit(code)


@friendly
def watch(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print each event, then the final job, as JSON lines.")] = False,
    stream: Annotated[bool, typer.Option("--stream/--poll", help="Follow the server's event stream, or poll.")] = True,
    interval: Annotated[float, typer.Option(min=0.1, max=3600, help="Seconds between polls (--poll, or when the stream is "
                        "unavailable).")] = 2.0,
) -> None:
    """Follow a job live until it ends; exit 0 if it succeeded, 1 if it failed, 3 if cancelled."""
    with client() as c:
        job = c.get_job(job_id)
        if job["status"] in TERMINAL:
            _finish_watch(job, as_json)
            return
        if as_json:
            for ev in follow_events(c, job_id, stream=stream, poll_s=interval):
                print(json.dumps(ev), flush=True)
            _finish_watch(c.get_job(job_id), as_json)
            return
        with LiveBar(job) as bar:
            refreshed = time.monotonic()
            for ev in follow_events(c, job_id, stream=stream, poll_s=interval):
                if _shown(ev):
                    bar.say(event_line(ev))
                if ev.get("type") == "metrics":
                    bar.metrics(ev.get("data") or {})
                # The job object has what events lack (ETA, queue position); a few reads a second at most.
                if ev.get("kind") == "status" or time.monotonic() - refreshed > 2:
                    bar.job(c.get_job(job_id))
                    refreshed = time.monotonic()
            job = c.get_job(job_id)
            bar.job(job)
    _finish_watch(job, as_json)


@friendly
def events(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    limit: Annotated[int, typer.Option(help="How many recent events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Keep printing new events until the job ends.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON: a list, or with --follow one event per line.")] = False,
) -> None:
    """Print a job's events, oldest first."""
    with client() as c:
        if follow:
            for ev in follow_events(c, job_id, limit=limit):
                print(json.dumps(ev) if as_json else event_line(ev), flush=True)
            return
        recent = list(reversed(c.events(job_id, limit=limit)))
    if as_json:
        print_json(recent)
        return
    for ev in recent:
        out.print(event_line(ev), markup=False, highlight=False)
