"""Reading and steering jobs: `tuneq status`, `list`, `cancel`, `pause`, `resume`, and `models`."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneq.cli.common import client, friendly, out, print_json
from tuneq.cli.render import event_line, list_table, method_label, print_job, progress_text, when


@friendly
def status(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")],
    events: Annotated[int, typer.Option(help="How many recent events to show.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")] = False,
) -> None:
    """Show a job's status, progress, metrics and latest events."""
    with client() as c:
        job = c.get_job(job_id)
        recent = c.events(job_id, limit=events) if events > 0 and not as_json else []
    if as_json:
        print_json(job)
        return
    print_job(job)
    if recent:
        out.print()
        for e in reversed(recent):
            out.print(event_line(e), markup=False, highlight=False)


def _control(action: str, job_id: str, as_json: bool) -> None:
    with client() as c:
        job = getattr(c, f"{action}_job")(job_id)
    if as_json:
        print_json(job)
    else:
        print(f"{job['id']} {job['status']}")


JobArg = Annotated[str, typer.Argument(metavar="JOB", help="A job id (ftjob-...).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the job object as JSON.")]


@friendly
def cancel(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Cancel a job (a running one stops at its next poll)."""
    _control("cancel", job_id, as_json)


@friendly
def pause(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Pause a job: a running one saves a checkpoint and frees its GPUs; `tuneq resume` continues it."""
    _control("pause", job_id, as_json)


@friendly
def resume(job_id: JobArg, as_json: JsonOpt = False) -> None:
    """Put a paused job back in the queue; it continues from its latest checkpoint."""
    _control("resume", job_id, as_json)


@friendly
def list_jobs(
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    status_filter: Annotated[str | None, typer.Option("--status", help="Only jobs in this status.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job objects as JSON.")] = False,
) -> None:
    """List recent jobs (alias: jobs)."""
    with client() as c:
        items = c.list_jobs(limit, status_filter)
    if as_json:
        print_json(items)
        return
    table = list_table(("job", "status", "model", "method", "progress", "created"))
    for j in items:
        table.add_row(j["id"], j["status"], j["model"], method_label(j), progress_text(j),
                      when(j["created_at"], "%m-%d %H:%M"))
    out.print(table)


@friendly
def models(as_json: Annotated[bool, typer.Option("--json", help="Print the model objects as JSON.")] = False) -> None:
    """List the models: the base models the server offers, then the fine-tuned ones you may use."""
    with client() as c:
        items = c.models()
    if as_json:
        print_json(items)
        return
    for m in items:
        print(m["id"])
