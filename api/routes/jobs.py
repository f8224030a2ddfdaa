"""Fine-tuning jobs: create (validate, persist, then enqueue), read, list, cancel.

Every job route loads its job through load_job, which answers 404 for a job the caller may not
see, so another user's job ids cannot even be confirmed to exist.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Query
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, object_session

from api import data_check, planning
from api.continuation import resolve_source
from api.deps import CurrentUser, SessionDep, SettingsDep
from api.errors import APIError, bad_request, not_found
from api.job_spec import base_learning_rate, build_spec
from api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, check_limit, make_page
from api.routes.files import bad_lines_summary
from api.schemas import CreateJobRequest, JobErrorOut, JobOut, Page
from api.limits import check_file_tokens
from core import states
from core.identity import can_change_job, can_read_file, can_read_job, readable_jobs
from core.jobs import create_job, request_cancel
from core.limits import check_job_quota, take_job_slot
from core.model_roots import resolve_model
from core.models import File, Job, User
from core.queue import enqueue_job
from core.progress import job_progress
from core.control import request_pause, request_resume

log = logging.getLogger("tuneq.api")

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])

ORGANIZATION = "tuneq"


def _int(t: float | None) -> int | None:
    return None if t is None else int(t)


def job_out(job: Job) -> JobOut:
    spec: dict[str, Any] = job.spec or {}
    method = spec.get("method", job.method)
    hp = dict(spec.get("hyperparameters") or {})
    if "learning_rate" in hp:
        hp["learning_rate_multiplier"] = hp["learning_rate"] / base_learning_rate(method)
    method_body: dict[str, Any] = {"hyperparameters": hp}
    if method in ("lora", "qlora") and spec.get("lora"):
        method_body = {**spec["lora"], **method_body}
    if method == "qlora" and spec.get("quantization"):
        method_body = {**method_body, "quantization": spec["quantization"]}
    if method in ("ia3", "prefix", "freeze") and spec.get(method):
        method_body = {**spec[method], **method_body}
    error = None
    if job.error:
        error = JobErrorOut(**{"message": "the job failed", **job.error})
    progress = job_progress(object_session(job), job)  # core/progress.py: FIELDS, queue_position 1 runs next
    return JobOut(
        id=job.id, created_at=int(job.created_at), finished_at=_int(job.finished_at), model=job.model,
        fine_tuned_model=job.fine_tuned_model, organization_id=job.owner_id or ORGANIZATION, status=job.status,
        training_file=job.training_file, validation_file=job.validation_file, hyperparameters=hp,
        seed=int(hp.get("seed", 0)), trained_tokens=job.trained_tokens, error=error, result_files=[],
        estimated_finish=_int(progress.get("estimated_finish")),
        method={"type": method, method: method_body},
        user_provided_suffix=job.suffix, priority=job.priority, gpus=job.gpus,
        progress=progress, metrics=job.metrics or {}, started_at=_int(job.started_at), host=job.host,
        plan=planning.job_view(job.plan, job.progress, job.metrics),
    )


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


def _usable_file(db: Session, file_id: str, param: str, user: User) -> File:
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


def _check_data(db: Session, spec: Any, training: File, validation: File | None, model_path: str,
                user: User) -> dict[str, dict[str, Any]]:
    """Every file of the job usable by this user and trainable with this model and max_seq_len.

    Mix and forgetting files may be in any format: replay data is often raw text.
    """
    max_len, fmt, inputs = spec.hyperparameters.max_seq_len, spec.data_format, spec.train_on_inputs
    files: list[tuple[File, str, str]] = [(training, "training_file", fmt)]
    if validation is not None:
        files.append((validation, "validation_file", fmt))
    for k, source in enumerate(spec.mix):
        files.append((_usable_file(db, source.file, f"mix[{k}].file", user), f"mix[{k}].file", "auto"))
    if spec.forgetting_file:
        files.append((_usable_file(db, spec.forgetting_file, "forgetting_file", user), "forgetting_file", "auto"))
    stats = {}
    for f, param, file_format in files:
        got = data_check.check_file(f, param, model_path, max_len, file_format, inputs)
        if got is not None:
            stats[param] = {"file": f.id, **got}
    return stats


def plan_job(spec: dict[str, Any], model_path: str, gpus: int, settings: Any, training: File,
             data_stats: dict[str, dict[str, Any]] | None) -> dict[str, Any] | None:
    """The planner's plan of a validated spec, with the time estimate when the token count is known."""
    tokens = planning.tokens_of(training.report) or planning.tokens_of((data_stats or {}).get("training_file"))
    p = planning.make_plan(spec, model_path, gpus, settings, dataset_tokens=tokens)
    return planning.to_json(p) if p is not None else None


@router.post("")
def create_fine_tuning_job(body: CreateJobRequest, user: CurrentUser, db: SessionDep, settings: SettingsDep) -> JobOut:
    try:
        take_job_slot(user.id, settings)
    except redis.RedisError as exc:
        raise APIError(503, f"the job queue is unreachable ({type(exc).__name__}); no job was created",
                       code="queue_unavailable") from None
    model_path = resolve_model(body.model, settings)
    training = _usable_file(db, body.training_file, "training_file", user)
    validation = _usable_file(db, body.validation_file, "validation_file", user) if body.validation_file else None
    source = resolve_source(db, user, body.from_checkpoint, body.model) if body.from_checkpoint else None
    examples = (training.report or {}).get("examples")
    spec = build_spec(body, model_path=model_path, init_from=source.ref if source else None,
                      inherited=source.method_fields() if source else None,
                      choose=planning.chooser(model_path, body.gpus, settings, examples if isinstance(examples, int) else None))
    for f, param in ((training, "training_file"), (validation, "validation_file")):
        if f is not None:
            check_file_tokens(f, param, model_path, spec.hyperparameters.max_seq_len, settings,
                              spec.data_format, spec.train_on_inputs)
    data_stats = _check_data(db, spec, training, validation, model_path, user)
    job_plan = plan_job(spec.model_dump(mode="json"), model_path, body.gpus, settings, training, data_stats)
    planning.refuse_if_too_big(job_plan)  # before OOM on a GPU an hour from now
    check_job_quota(db, user, body.gpus, settings)
    job = create_job(
        db, spec=spec.model_dump(mode="json"), model=body.model, method=spec.method, training_file=training,
        validation_file=validation, suffix=spec.suffix, owner_id=user.id, priority=body.priority, gpus=body.gpus,
    )
    job.plan = job_plan
    if data_stats:
        states.add_event(db, job, data_check.summary(data_stats, spec.hyperparameters.max_seq_len),
                         type="data_check", data=data_stats)
    # Commit before enqueueing: a worker may take the message before this request returns.
    db.commit()
    try:
        enqueue_job(job.id)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves a job nobody will run
        log.exception("enqueue of %s failed", job.id)
        message = f"the job queue is unreachable ({type(exc).__name__}); job {job.id} was not started"
        states.transition(db, job, states.FAILED, message, error={"code": "queue_unavailable", "message": message})
        db.commit()
        raise APIError(503, message, code="queue_unavailable") from None
    return job_out(job)


@router.get("")
def list_fine_tuning_jobs(
    user: CurrentUser,
    db: SessionDep,
    settings: SettingsDep,
    after: AfterQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    status: Annotated[str | None, Query(description="Only jobs in this status (tuneq extension).")] = None,
) -> Page[JobOut]:
    check_limit(limit, settings)
    stmt = select(Job).where(readable_jobs(user))
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after is not None:
        cursor = db.get(Job, after)
        if cursor is None or not can_read_job(db, user, cursor):
            raise bad_request(f"after: no fine-tuning job with id {after!r}", "after")
        stmt = stmt.where(or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id)))
    rows = db.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).all()
    return make_page(rows, limit, job_out)


@router.get("/{job_id}")
def get_fine_tuning_job(job_id: str, user: CurrentUser, db: SessionDep) -> JobOut:
    return job_out(load_job(db, job_id, user))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, user: CurrentUser, db: SessionDep) -> JobOut:
    job = request_cancel(db, load_job(db, job_id, user, change=True))
    db.commit()
    return job_out(job)


@router.post("/{job_id}/pause")
def pause_fine_tuning_job(job_id: str, user: CurrentUser, db: SessionDep) -> JobOut:
    """A running job saves a checkpoint, frees its GPUs and stays `paused` until resumed."""
    job = request_pause(db, load_job(db, job_id, user, change=True))
    db.commit()
    return job_out(job)


@router.post("/{job_id}/resume")
def resume_fine_tuning_job(job_id: str, user: CurrentUser, db: SessionDep) -> JobOut:
    """A paused job goes back to the queue and continues from its latest checkpoint."""
    job = request_resume(db, load_job(db, job_id, user, change=True))
    db.commit()
    if job.status == states.QUEUED:
        try:
            enqueue_job(job.id)
        except Exception:  # noqa: BLE001 - the workers' dispatcher re-sends queued jobs anyway
            log.warning("enqueue of resumed job %s failed; the dispatcher will send it", job.id, exc_info=True)
    return job_out(job)
