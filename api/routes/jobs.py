"""Fine-tuning jobs: create (api.admission), read, list, cancel, pause, resume.

Every job route gets its job through api.deps (ReadableJob, ChangeableJob), which answers 404 for
a job the caller may not see, so another user's job ids cannot even be confirmed to exist.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, or_, select
from fastapi.responses import Response
from sqlalchemy.orm import Session, object_session

from api import admission, planning
from api.crud import load_job
from api.deps import BearerToken, ChangeableJob, CurrentUser, SessionDep, SettingsDep, read_in_one_hop
from api.errors import bad_request
from api.job_spec import METADATA_KEY_CHARS, base_learning_rate, method_view
from api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, make_page, page_size
from api.schemas import CreateJobRequest, JobErrorOut, JobOut, Page, owner_of
from core import gang, states
from core.control import request_pause, request_resume
from core.identity import can_read_job, readable_jobs
from core.jobs import request_cancel
from core.models import Job, JobEvent, User
from core.settings import Settings
from core.progress import TRAINED, job_progress, latest_metrics_of
from core.queue import enqueue_job
from core.scheduling import shown_positions

log = logging.getLogger("tuneq.api")

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def job_out(job: Job, positions: Mapping[str, int] | None = None,
            metrics: Mapping[str, JobEvent | None] | None = None) -> JobOut:
    """`positions`: the queue positions of a page of jobs, read once (core.scheduling.shown_positions);
    `metrics`: their latest metrics events, read at once (core.progress.latest_metrics_of)."""
    spec: dict[str, Any] = job.spec or {}
    method = spec.get("method", job.method)
    hp = dict(spec.get("hyperparameters") or {})
    if "learning_rate" in hp:
        hp["learning_rate_multiplier"] = hp["learning_rate"] / base_learning_rate(method, spec.get("objective") or "sft")
    error = None
    if job.error:
        error = JobErrorOut(**{"message": "the job failed", **job.error})
    progress = job_progress(object_session(job), job, positions=positions, metrics=metrics)  # core/progress.py: FIELDS, queue_position 1 runs next
    return JobOut(
        id=job.id, created_at=int(job.created_at), finished_at=_int(job.finished_at), model=job.model,
        fine_tuned_model=job.fine_tuned_model, organization_id=owner_of(job.owner_id), status=job.status,
        training_file=job.training_file, validation_file=job.validation_file, hyperparameters=hp,
        seed=int(hp.get("seed", 0)), trained_tokens=job.trained_tokens, error=error, result_files=job.result_files or [],
        estimated_finish=_int(progress.get("estimated_finish")),
        method=method_view({**spec, "method": method}, hp),
        user_provided_suffix=job.suffix, priority=job.priority, gpus=job.gpus,
        progress=progress, metrics=job.metrics or {}, started_at=_int(job.started_at), host=job.host, gpu=job.gpu,
        nodes=job.nodes, hosts=_hosts(job),
        plan=planning.job_view(job.plan, job.progress, job.metrics, job.min_gpu_memory_gib),
        metadata=job.job_metadata or None, integrations=spec.get("integrations") or [],
    )


def _hosts(job: Job) -> list[str] | None:
    if job.nodes <= 1 or job.status not in (states.RUNNING, states.CANCELLING):
        return None
    db = object_session(job)
    return [m.host for m in gang.members(db, job.id)] if db is not None else None


def _metadata_filter(request: Request) -> list[Any]:
    """OpenAI's list filter: query parameters `metadata[key]=value`, or `metadata=null`."""
    conditions: list[Any] = []
    for name, value in request.query_params.multi_items():
        if name == "metadata":
            if value != "null":
                raise bad_request("metadata: filter with metadata[key]=value, or metadata=null for jobs without any",
                                  "metadata")
            conditions.append(Job.job_metadata.is_(None))
        elif name.startswith("metadata[") and name.endswith("]"):
            key = name[len("metadata["):-1]
            if not key or len(key) > METADATA_KEY_CHARS or '"' in key or "\\" in key:
                raise bad_request(f"metadata[{key}]: not a metadata key", f"metadata[{key}]")
            conditions.append(Job.job_metadata[key].as_string() == value)
    return conditions


@router.post("")
def create_fine_tuning_job(body: CreateJobRequest, user: CurrentUser, db: SessionDep, settings: SettingsDep) -> JobOut:
    return job_out(admission.admit(db, user, body, settings))


@router.get("", response_model=Page[JobOut])
async def list_fine_tuning_jobs(
    request: Request,
    token: BearerToken,
    settings: SettingsDep,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    status: Annotated[str | None, Query(description="Only jobs in this status (tuneq extension).")] = None,
) -> Response:
    """Newest first. `metadata[key]=value` (repeatable) keeps jobs tagged so, `metadata=null` those without any."""
    conditions = _metadata_filter(request)  # parsed here: a bad filter is a 400 before any query
    return await read_in_one_hop(_list_jobs, token, settings, after, limit, status, conditions)


def _list_jobs(db: Session, user: User, settings: Settings, after: str | None, limit: int, status: str | None,
               conditions: list[Any]) -> Page[JobOut]:
    limit = page_size(limit, settings)
    stmt = select(Job).where(readable_jobs(user), *conditions)
    if status is not None:
        if status not in states.ALLOWED:  # a typo would otherwise list nothing, as if no job had it
            raise bad_request(f"status: must be one of {', '.join(states.ALLOWED)}, got {status!r}", "status")
        stmt = stmt.where(Job.status == status)
    if after is not None:
        cursor = db.get(Job, after)
        if cursor is None or not can_read_job(db, user, cursor):
            raise bad_request(f"after: no fine-tuning job with id {after!r}", "after")
        stmt = stmt.where(or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = db.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    # One query for the latest metrics of the page; one reading of the queue for the whole page
    # (shared with other requests for a moment), in the order the single GET and workers use.
    metrics = latest_metrics_of(db, [j.id for j in page if j.status in TRAINED])
    db.commit()  # see _read_job: no connection held while waiting for the reading
    positions = shown_positions(db, (j.id for j in page if j.status == states.QUEUED), settings.api_queue_position_max_age_s)
    return make_page(rows, limit, lambda j: job_out(j, positions, metrics))


@router.get("/{job_id}", response_model=JobOut)
async def get_fine_tuning_job(job_id: str, token: BearerToken, settings: SettingsDep) -> Response:
    return await read_in_one_hop(_read_job, token, job_id, settings)


def _read_job(db: Session, user: User, job_id: str, settings: Settings) -> JobOut:
    job = load_job(db, job_id, user)
    if job.status != states.QUEUED:
        return job_out(job)
    # End the read first: requests wait for one another's reading of the queue, and one that
    # waits holding a pooled connection could leave the reader none for the rest of the queue.
    db.commit()
    return job_out(job, shown_positions(db, [job.id], settings.api_queue_position_max_age_s))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job: ChangeableJob, db: SessionDep) -> JobOut:
    job = request_cancel(db, job)
    db.commit()
    return job_out(job)


@router.post("/{job_id}/pause")
def pause_fine_tuning_job(job: ChangeableJob, db: SessionDep) -> JobOut:
    """A running job saves a checkpoint, frees its GPUs and stays `paused` until resumed."""
    job = request_pause(db, job)
    db.commit()
    return job_out(job)


@router.post("/{job_id}/resume")
def resume_fine_tuning_job(job: ChangeableJob, db: SessionDep) -> JobOut:
    """A paused job goes back to the queue and continues from its latest checkpoint."""
    job = request_resume(db, job)
    db.commit()
    if job.status == states.QUEUED:
        try:
            enqueue_job(job.id)
        except Exception:  # noqa: BLE001 - the workers' dispatcher re-sends queued jobs anyway
            log.warning("enqueue of resumed job %s failed; the dispatcher will send it", job.id, exc_info=True)
    return job_out(job)
