"""A job's saved checkpoints, newest first."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import and_, or_, select

from api.crud import load_job
from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import bad_request
from api.pagination import AfterQuery, LimitQuery, make_page, page_size
from api.schemas import CheckpointOut, Page
from core.inference import checkpoint_model_name
from core.models import Checkpoint, Job

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def checkpoint_out(job: Job, ck: Checkpoint) -> CheckpointOut:
    return CheckpointOut(
        id=ck.id, created_at=int(ck.created_at), fine_tuned_model_checkpoint=checkpoint_model_name(job, ck.step),
        fine_tuning_job_id=job.id, metrics=ck.metrics or {}, step_number=ck.step,
    )


@router.get("/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    job_id: str, user: CurrentUser, db: SessionDep, settings: SettingsDep, after: AfterQuery = None,
    limit: LimitQuery = 10,
) -> Page[CheckpointOut]:
    limit = page_size(limit, settings)
    job = load_job(db, job_id, user)
    # Only checkpoints whole in the store: any host can resume or continue from those.
    stmt = select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.uploaded_at.is_not(None))
    if after is not None:
        cursor = db.scalar(select(Checkpoint).where(Checkpoint.id == after, Checkpoint.job_id == job.id))
        if cursor is None:
            raise bad_request(f"after: no checkpoint with id {after!r} in job {job.id}", "after")
        stmt = stmt.where(or_(Checkpoint.step < cursor.step, and_(Checkpoint.step == cursor.step, Checkpoint.id < cursor.id)))
    rows = db.scalars(stmt.order_by(Checkpoint.step.desc(), Checkpoint.id.desc()).limit(limit + 1)).all()
    return make_page(rows, limit, lambda ck: checkpoint_out(job, ck))
