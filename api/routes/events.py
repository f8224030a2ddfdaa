"""A job's event log, newest first like OpenAI's."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import bad_request
from api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, check_limit, make_page
from api.routes.jobs import load_job
from api.schemas import EventOut, Page
from core.models import JobEvent

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def event_out(ev: JobEvent) -> EventOut:
    return EventOut(id=ev.id, created_at=int(ev.created_at), level=ev.level, message=ev.message, type=ev.type, data=ev.data)


@router.get("/{job_id}/events")
def list_fine_tuning_events(
    job_id: str, user: CurrentUser, db: SessionDep, settings: SettingsDep, after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> Page[EventOut]:
    check_limit(limit, settings)
    job = load_job(db, job_id, user)
    # seq, not created_at: events written in one transaction share a timestamp but never a seq.
    stmt = select(JobEvent).where(JobEvent.job_id == job.id)
    if after is not None:
        cursor = db.scalar(select(JobEvent).where(JobEvent.id == after, JobEvent.job_id == job.id))
        if cursor is None:
            raise bad_request(f"after: no event with id {after!r} in job {job.id}", "after")
        stmt = stmt.where(JobEvent.seq < cursor.seq)
    rows = db.scalars(stmt.order_by(JobEvent.seq.desc()).limit(limit + 1)).all()
    return make_page(rows, limit, event_out)
