"""Job admission: a creation body in, a stored and queued job out.

Every check that can refuse a job runs before anything is stored: a queue slot, the model and
the files, the spec, the token limits and the data check, whether the plan fits, the quota. The
job's plan is made once. When the body asks for method or batch_size "auto", the plan of the job
as asked ("auto" included) makes that choice and is the job's plan; otherwise it is the plan of
the finished spec. The plan route shows the same plan without storing anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from sqlalchemy.orm import Session

from api import data_check, planning, validation
from api.continuation import Source, continued_from_model, resolve_source
from api.crud import file_gone, usable_file
from api.errors import APIError
from api.job_spec import build_spec
from api.limits import check_file_tokens
from api.schemas import CreateJobRequest
from core import states
from core.jobs import check_gpus_fit, create_job, spread_over_hosts
from core.limits import (check_gpus_allowed, check_job_quota, deleted_files, job_file_ids, lock_files,
                         planned_gpu_hours, release_job_slot, take_job_slot)
from core.model_roots import resolve_model
from core.models import File, Job, User
from core.policy import check_priority
from core.queue import enqueue_job
from core.db import session_scope
from core.settings import Settings, get_settings
from trainer.data.parse import EVAL_FORMAT
from trainer.spec import Hyperparameters, JobSpec
from trainer.vocabulary import extra_files

log = logging.getLogger("tuneq.api")


@dataclass
class Request:
    """A creation body resolved against the database: the model's directory, the files, the source."""

    body: CreateJobRequest
    model_path: str
    training: File
    validation: File | None
    source: Source | None

    @property
    def examples(self) -> int | None:
        n = (self.training.report or {}).get("examples")
        return n if isinstance(n, int) else None


def resolve(db: Session, user: User, body: CreateJobRequest, settings: Settings, *, validation: bool = True) -> Request:
    model_path = resolve_model(body.model, settings)
    training = usable_file(db, body.training_file, "training_file", user)
    val = usable_file(db, body.validation_file, "validation_file", user) if validation and body.validation_file else None
    source = resolve_source(db, user, body.from_checkpoint, body.model) if body.from_checkpoint else None
    return Request(body, model_path, training, val, source)


def training_tokens(req: Request, max_seq_len: int, data_format: str, train_on_inputs: bool | None) -> int | None:
    """Tokens of the training file as the job would train on them; None when they cannot be counted.

    A file the job cannot use is not refused here: the data check refuses it, with its reason,
    after the spec's own checks. The count is cached, so the data check does not tokenize again.
    A file too large to tokenize within a request is counted only if it was counted before.
    """
    shape = {"model": req.model_path, "hyperparameters": {"max_seq_len": max_seq_len}, "data_format": data_format,
             "train_on_inputs": train_on_inputs}
    if not validation.check_inline([req.training], shape, get_settings()):
        return planning.tokens_of(req.training.report)
    try:
        stats = data_check.check_file(req.training, "training_file", req.model_path, max_seq_len, data_format,
                                      train_on_inputs)
    except APIError:
        stats = None
    return planning.tokens_of(req.training.report) or planning.tokens_of(stats)


def _draft_tokens(req: Request, draft: dict[str, Any]) -> int | None:
    # The draft's hyperparameters are not validated yet: counted only with a max_seq_len the spec takes.
    hp = draft.get("hyperparameters") or {}
    try:
        seq = Hyperparameters.model_validate({"max_seq_len": hp["max_seq_len"]} if "max_seq_len" in hp else {})
    except ValidationError:
        return None
    return training_tokens(req, seq.max_seq_len, draft.get("data_format", "auto"), draft.get("train_on_inputs"))


class OnePlan:
    """The job's one plan: made while building the spec when "auto" is asked, else of the spec."""

    def __init__(self, req: Request, settings: Settings, *, refuse: bool) -> None:
        # refuse=False (the plan route) picks something valid even when nothing fits, so the plan
        # can still be shown.
        self.req, self.settings, self.refuse = req, settings, refuse
        self.plan: dict[str, Any] | None = None
        self.tokens: int | None = None  # the training tokens the plan was made with
        self.made = False

    def _make(self, spec_like: dict[str, Any], tokens: int | None) -> dict[str, Any] | None:
        p = planning.make_plan(spec_like, self.req.model_path, self.req.body.gpus, self.settings, dataset_tokens=tokens)
        self.plan, self.tokens, self.made = (planning.to_json(p) if p is not None else None), tokens, True
        return self.plan

    def choose(self, draft: dict[str, Any]) -> tuple[str, int | None]:
        """Method "auto" and batch_size "auto" of a draft (api.job_spec.Chooser), from its plan."""
        p = self._make(draft, _draft_tokens(self.req, draft))
        fallback = draft["method"] if draft["method"] != "auto" else "lora"
        if p is None:
            if draft["method"] == "auto":
                raise APIError(400, "method: 'auto' needs a model whose config.json the planner can read (a local model)",
                               param="method", code="invalid_value")
            return draft["method"], None
        if not p["checked"]:
            if draft["method"] == "auto":
                p["notes"].append(f"method 'auto' is {fallback}: the planner cannot vouch for its pick on this model")
            return fallback, None  # the spec's default batch size: the planner cannot vouch for another
        if self.refuse:
            planning.refuse_if_too_big(p)
        batch = p["batch_size"]
        if p["method"] is None:
            return (draft["method"] if draft["method"] != "auto" else "qlora"), None
        examples = self.req.examples
        if batch is not None and examples and draft["hyperparameters"].get("batch_size") == "auto":
            # A micro-batch larger than the data set only pads: cap it at the examples there are.
            capped = min(batch, 1 << (examples.bit_length() - 1))
            if capped < batch:
                p["notes"].append(f"batch_size {batch} fits; the job takes {capped}, as its file has {examples} "
                                  f"examples (the memory estimate is for {batch})")
            batch = capped
        return p["method"], batch

    def of_spec(self, spec: JobSpec, tokens: int | None) -> dict[str, Any] | None:
        """The plan made by choose(), else the plan of the finished spec."""
        if not self.made:
            self._make(spec.model_dump(mode="json"), tokens)
        return self.plan


def build(req: Request, one: OnePlan) -> JobSpec:
    init_from = req.source.ref if req.source else None
    inherited = req.source.method_fields() if req.source else None
    spec = build_spec(req.body, model_path=req.model_path, init_from=init_from, inherited=inherited, choose=one.choose)
    if req.source is not None:
        req.source.check_continues(spec)
    return spec


def job_files(db: Session, user: User, spec: JobSpec, req: Request) -> list[tuple[File, str, str]]:
    """(file, param, format) of every file the job reads, each usable by this user.

    Mix and forgetting files may be in any format (replay data is often raw text); the eval file
    is in the eval format.
    """
    fmt = "preference" if spec.is_preference else spec.data_format  # as the trainer reads them
    files: list[tuple[File, str, str]] = [(req.training, "training_file", fmt)]
    if req.validation is not None:
        files.append((req.validation, "validation_file", fmt))
    for param, file_id, file_format in extra_files(spec.model_dump(mode="json")):
        f = usable_file(db, file_id, param, user)
        uploaded_as = (f.report or {}).get("format")
        if file_format == EVAL_FORMAT and uploaded_as != EVAL_FORMAT:
            raise APIError(400, f"{param}: file {f.id} is a {uploaded_as} file; an eval file has lines "
                           "{\"messages\": [... ending with a user turn], \"expected\": \"the answer\"}",
                           param=param, code="invalid_file")
        files.append((f, param, file_format))
    return files


def check_data(files: list[tuple[File, str, str]], spec: JobSpec, model_path: str, settings: Settings, *,
               in_child: bool = False) -> dict[str, dict[str, Any]]:
    """Every file trainable with this model and max_seq_len, and within the token limit; the
    token statistics of each. APIError names the file and, for a bad line, its number.

    in_child: tokenize in the API's checking child process (a job in validating_files), not here.
    """
    max_len, inputs = spec.hyperparameters.max_seq_len, spec.train_on_inputs
    for f, param, file_format in files:
        if param in ("training_file", "validation_file"):
            check_file_tokens(f, param, model_path, max_len, settings, file_format, inputs, in_child=in_child)
    stats = {}
    for f, param, file_format in files:
        got = data_check.check_file(f, param, model_path, max_len, file_format, inputs, in_child=in_child)
        if got is not None and got["format"] == "preference" and file_format == "auto":
            raise _preference_file(f, param)
        if got is not None:
            stats[param] = {"file": f.id, **got}
    return stats


def _preference_file(f: File, param: str) -> APIError:
    return APIError(400, f"{param}: file {f.id} holds preference pairs (preferred_output, non_preferred_output); "
                    "train them with method type 'dpo', 'simpo' or 'orpo'", param=param, code="invalid_file")


def check_file_kind(f: File, param: str, spec: JobSpec) -> None:
    """The refusals of check_data that the upload's own report already decides, for the plan,
    which does not check the data line by line: pairs for a supervised job, or no pairs for a
    preference one."""
    uploaded_as = (f.report or {}).get("format")
    if uploaded_as is None or not (f.report or {}).get("valid", True):
        return  # unknown here; the job's data check decides
    if spec.is_preference and uploaded_as != "preference":
        raise APIError(400, f"{param}: file {f.id} is a {uploaded_as} file; method type {spec.objective!r} trains on "
                       "preference lines ({\"input\", \"preferred_output\", \"non_preferred_output\"})",
                       param=param, code="invalid_file")
    if not spec.is_preference and uploaded_as == "preference" and spec.data_format == "auto":
        raise _preference_file(f, param)


def check_schedule(spec: JobSpec, settings: Settings) -> None:
    """The service's floor under clock checkpoints: each one stops the job to write to disk."""
    minutes = spec.schedule.checkpoint_every_minutes
    if minutes is not None and minutes < settings.min_checkpoint_every_minutes:
        raise APIError(400, f"schedule.checkpoint_every_minutes: {minutes:g} is below the "
                       f"{settings.min_checkpoint_every_minutes:g} minutes this service allows "
                       "(TUNEQ_MIN_CHECKPOINT_EVERY_MINUTES)", param="schedule.checkpoint_every_minutes",
                       code="invalid_value")


@contextmanager
def rate_slot(user: User, settings: Settings) -> Iterator[None]:
    """One of the user's job creation slots, given back when the creation inside fails."""
    try:
        slot = take_job_slot(user.id, settings)
    except redis.RedisError as exc:
        raise APIError(503, f"the job queue is unreachable ({type(exc).__name__}); no job was created",
                       code="queue_unavailable") from None
    try:
        yield
    except BaseException:
        with suppress(redis.RedisError):  # the refusal, not a lost slot, is what the caller must hear
            release_job_slot(user.id, slot, settings)
        raise


def across_hosts(body: CreateJobRequest) -> CreateJobRequest:
    """More GPUs than the largest registered host has, without `nodes`: the job is spread over the
    fewest hosts that hold them in equal parts (core.jobs.spread_over_hosts)."""
    gpus, nodes = spread_over_hosts(body.gpus, body.nodes)
    if (gpus, nodes) == (body.gpus, body.nodes or 1):
        return body
    return body.model_copy(update={"gpus": gpus, "nodes": nodes})


def admit(db: Session, user: User, body: CreateJobRequest, settings: Settings) -> Job:
    """Check a creation body, store the job with its plan and data check, and enqueue it."""
    submitted = time.time()
    body = continued_from_model(db, user, across_hosts(body))
    check_priority(db, user, body.priority, settings)
    check_gpus_allowed(body.gpus, settings, body.nodes or 1)
    req = resolve(db, user, body, settings)
    one = OnePlan(req, settings, refuse=True)
    spec = build(req, one)
    files = job_files(db, user, spec, req)
    # Files too large to tokenize within the request are checked after it (api.validation).
    now_ = validation.check_inline([f for f, _, _ in files], spec.model_dump(mode="json"), settings)
    data_stats = check_data(files, spec, req.model_path, settings) if now_ else {}
    tokens = planning.tokens_of(req.training.report) or planning.tokens_of(data_stats.get("training_file"))
    job_plan = one.of_spec(spec, tokens)
    planning.refuse_if_too_big(job_plan)  # before OOM on a GPU an hour from now
    check_schedule(spec, settings)
    with rate_slot(user, settings):  # taken only now: a refused body uses no slot
        check_job_quota(db, user, spec.ranks(body.gpus), settings, planned_gpu_hours(job_plan))
        spec_json = spec.model_dump(mode="json")
        file_ids = job_file_ids(req.training.id, req.validation.id if req.validation else None, spec_json)
        lock_files(db, file_ids)  # held until the job is committed: a DELETE of these files waits, then sees it
        gone = deleted_files(db, file_ids)
        if gone:  # deleted while this request was checking the job
            raise file_gone(gone[0], {f.id: param for f, param, _ in files}.get(gone[0]))
        job = create_job(
            db, spec=spec_json, model=body.model, method=spec.method, training_file=req.training,
            validation_file=req.validation, suffix=spec.suffix, owner_id=user.id, priority=body.priority, gpus=body.gpus,
            validated=now_, metadata=body.metadata,
        )
        set_plan(job, job_plan)
        # The start-up's first phase (validation) counts from the request, the data check inside it.
        job.progress = {**(job.progress or {}), "submitted_at": submitted}
        if not now_:
            # Stored under this process's lease before the answer: if the process dies before the
            # check ends, another API process finds the lapsed lease and checks the job.
            validation.hold(job)
            db.commit()
        else:
            record_check(db, job, data_stats, spec.hyperparameters.max_seq_len)
    if not now_:
        validation.CHECKER.start(job.id)
        return job
    return enqueue_checked(db, job)


def set_plan(job: Job, plan: dict[str, Any] | None) -> None:
    """Store the job's plan and the least GPU memory it needs, which the workers check cheaply:
    only a checked plan (a model the planner vouches for) keeps a job off smaller GPUs."""
    job.plan = plan
    job.min_gpu_memory_gib = plan.get("min_gpu_memory_gib") if plan is not None and plan.get("checked") else None


def record_check(db: Session, job: Job, data_stats: dict[str, dict[str, Any]], max_len: int) -> None:
    """The data check's event, committed: a worker may take the job's message before a request returns.
    progress.queued_at ends the start-up's validation phase and begins its queue phase."""
    job.progress = {**(job.progress or {}), "queued_at": time.time()}
    if data_stats:
        states.add_event(db, job, data_check.summary(data_stats, max_len), type="data_check", data=data_stats)
    db.commit()


def queue_checked(db: Session, job: Job, data_stats: dict[str, dict[str, Any]], max_len: int) -> Job:
    """Record the data check, commit, and hand the job (now `queued`) to the workers."""
    record_check(db, job, data_stats, max_len)
    return enqueue_checked(db, job)


def enqueue_checked(db: Session, job: Job) -> Job:
    """Hand a committed, checked job to the workers; a broker failure fails it and says why."""
    try:
        enqueue_job(job.id)
    except Exception as exc:  # noqa: BLE001 - any broker failure leaves a job nobody will run
        log.exception("enqueue of %s failed", job.id)
        message = f"the job queue is unreachable ({type(exc).__name__}); job {job.id} was not started"
        states.transition(db, job, states.FAILED, message, error={"code": "queue_unavailable", "message": message})
        db.commit()
        raise APIError(503, message, code="queue_unavailable") from None
    return job


def finish_validation(job_id: str, owner: str) -> None:
    """The data check of a job left in validating_files: then `queued`, or `failed` with the
    report a quick check would have answered with. Runs only while `owner` holds the job's lease."""
    settings = get_settings()
    failure: APIError | None = None
    stats: dict[str, dict[str, Any]] = {}
    with session_scope() as db:
        job = validation.locked(db, job_id, owner)
        if job is None:
            return  # cancelled meanwhile, or another process took it over
        spec = JobSpec.model_validate(job.spec)
        try:
            files = validation.files_of(db, spec)
        except APIError as exc:
            failure = exc
    if failure is None:  # no transaction (or row lock) is held while the child tokenizes
        try:
            stats = check_data(files, spec, spec.model, settings, in_child=True)
        except APIError as exc:
            failure = exc
    with session_scope() as db:
        job = validation.locked(db, job_id, owner)
        if job is None:
            return
        if failure is not None:
            error = {"code": failure.code, "message": failure.message, "param": failure.param}
            states.transition(db, job, states.FAILED, failure.message, error=error)
            return
        tokens = planning.tokens_of(stats.get("training_file"))
        if tokens and job.plan is not None:
            spec_like = job.spec
            if job.plan.get("requested_batch_size") == "auto":  # still each host's to pick
                spec_like = {**spec_like, "hyperparameters": {**spec_like["hyperparameters"], "batch_size": "auto"}}
            p = planning.make_plan(spec_like, spec.model, job.gpus, settings, dataset_tokens=tokens)
            if p is not None:
                set_plan(job, planning.to_json(p))
        states.transition(db, job, states.QUEUED, "Job queued.")
        try:
            queue_checked(db, job, stats, spec.hyperparameters.max_seq_len)
        except APIError:
            pass  # the job is failed and says why; nobody waits on this answer


def plan_only(db: Session, user: User, body: CreateJobRequest, settings: Settings) -> tuple[dict[str, Any], int | None]:
    """The plan of a creation body and the training tokens it counted; nothing is stored."""
    body = continued_from_model(db, user, across_hosts(body))
    req = resolve(db, user, body, settings, validation=False)
    one = OnePlan(req, settings, refuse=False)
    spec = build(req, one)
    check_gpus_fit(body.gpus, spec.nodes)
    check_file_kind(req.training, "training_file", spec)
    tokens = None
    if not one.made:
        tokens = training_tokens(req, spec.hyperparameters.max_seq_len, spec.data_format, spec.train_on_inputs)
    p = one.of_spec(spec, tokens)
    if p is None:
        raise APIError(400, f"model: {body.model!r} has no local config.json to plan from (hub models are not fetched "
                       "by the API)", param="model", code="model_unplannable")
    return p, one.tokens
