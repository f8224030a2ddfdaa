"""Lookups of the rows a request names: a job or file the caller may see, a file a job may use.

Another user's rows answer like missing ones, so their ids cannot even be confirmed to exist.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.errors import APIError, bad_request, not_found
from core.identity import can_change_job, can_read_file, can_read_job
from core.models import File, Job, User

# How many bad lines a message names; the full list is in the file's `validation`.
DETAILS_LINES = 5


def load_job(db: Session, job_id: str, user: User, *, change: bool = False) -> Job:
    """The job if `user` may read it (or, with change=True, cancel/pause/resume it)."""
    job = db.get(Job, job_id)
    if job is None or not can_read_job(db, user, job):
        raise not_found("fine-tuning job", job_id)
    if change and not can_change_job(user, job):
        # The caller can see this job (a teammate's), so 404 would be a lie; 403 says why.
        raise APIError(403, f"job {job_id} belongs to another member of your team; only its owner or an admin may change it",
                       code="not_job_owner")
    return job


def load_file(db: Session, file_id: str, user: User, param: str | None = None) -> File:
    """The file if `user` may read it; another user's file answers like a missing one."""
    f = db.get(File, file_id)
    if f is None or not can_read_file(user, f):
        raise not_found("file", file_id, param)
    return f


def usable_file(db: Session, file_id: str, param: str, user: User) -> File:
    """A file a job of `user` may train on: readable, for fine-tuning, and valid; else 400 naming `param`."""
    f = db.get(File, file_id)
    if f is None or not can_read_file(user, f):
        raise bad_request(f"{param}: no file with id {file_id!r}; upload it with POST /v1/files", param, "file_not_found")
    if f.purpose != "fine-tune":
        raise bad_request(f"{param}: file {file_id} has purpose {f.purpose!r}, not 'fine-tune'", param)
    if f.status != "processed":
        raise bad_request(
            f"{param}: file {file_id} failed validation, {bad_lines_summary(f.report)}; fix the file and upload it again",
            param, "invalid_file",
        )
    return f


def file_gone(file_id: str, param: str | None) -> APIError:
    """A file a job names that was deleted while the request creating the job checked it."""
    return APIError(400, f"{param or 'file'}: file {file_id} was deleted; upload it again", param=param,
                    code="file_not_found")


def bad_lines_summary(report: dict[str, Any]) -> str:
    errors = report.get("errors") or []
    if not errors:
        return "the file is not a valid fine-tuning file"
    total = sum((report.get("error_counts") or {}).values()) or len(errors)
    shown = "; ".join(f"line {e.get('line')}: {e.get('message') or e.get('code')}" for e in errors[:DETAILS_LINES])
    more = f"; and {total - DETAILS_LINES} more" if total > DETAILS_LINES else ""
    return f"{total} bad line{'s' if total != 1 else ''}: {shown}{more}"
