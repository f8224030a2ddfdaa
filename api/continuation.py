"""`from_checkpoint`: a new job that starts from a previous job's final weights or checkpoint.

OpenAI's own way to ask the same is a fine-tuned model (or checkpoint) name as the job's `model`:
such a job trains the base that model was trained on, from its weights (continued_from_model).

The API checks what it can see in the database (the source exists, the caller may read it, it
finished, it trained the same base model) and stores the id as the spec's init_from; the worker
turns the id into a local directory when the job runs, as it does with file ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.errors import bad_request
from api.schemas import CreateJobRequest
from core import states
from core.identity import can_read_job
from core.inference import find_fine_tuned, is_fine_tuned_name
from core.models import Checkpoint, Job, User
from trainer.init_weights import source_mismatch
from trainer.spec import METHOD_SETTINGS, JobSpec

PARAM = "from_checkpoint"
# Spec fields that define the adapter's shape; a continued job without a method takes them over.
METHOD_FIELDS = ("method", *dict.fromkeys(name for names in METHOD_SETTINGS.values() for name in names))


@dataclass
class Source:
    ref: str  # the id stored as init_from
    job: Job

    def method_fields(self) -> dict[str, Any]:
        spec = self.job.spec or {}
        return {k: spec[k] for k in METHOD_FIELDS if spec.get(k) is not None}

    def check_continues(self, spec: JobSpec) -> None:
        """400 when the new job's method cannot take the weights this source saved (an adapter
        for a whole-model method, another kind or rank of adapter), as the trainer would find."""
        try:
            source = JobSpec.model_validate(self.job.spec or {})
        except ValidationError:
            return  # a spec of an older schema: the trainer checks the saved files themselves
        problem = source_mismatch(spec, source)
        if problem:
            raise bad_request(f"{PARAM}: {self.ref} cannot start this job: {problem}; give a method that matches, "
                              "or leave method out to keep the earlier job's", PARAM, "incompatible_checkpoint")


def resolve_source(db: Session, user: User, ref: str, model: str) -> Source:
    if ref.startswith("ftckpt-"):
        ck = db.get(Checkpoint, ref)
        job = db.get(Job, ck.job_id) if ck is not None else None
        if job is None or not can_read_job(db, user, job):
            raise bad_request(f"{PARAM}: no checkpoint with id {ref!r}", PARAM, "checkpoint_not_found")
        if ck is not None and ck.uploaded_at is None:
            raise bad_request(f"{PARAM}: checkpoint {ref} is still being stored; try again in a moment", PARAM)
    elif ref.startswith("ftjob-"):
        job = db.get(Job, ref)
        if job is None or not can_read_job(db, user, job):
            raise bad_request(f"{PARAM}: no fine-tuning job with id {ref!r}", PARAM, "job_not_found")
        if job.status != states.SUCCEEDED:
            raise bad_request(
                f"{PARAM}: job {ref} is {job.status}; only a succeeded job has final weights "
                "(give one of its checkpoints, ftckpt-…, instead)", PARAM,
            )
    else:
        raise bad_request(f"{PARAM}: give a job id (ftjob-…) or a checkpoint id (ftckpt-…), got {ref!r}", PARAM)
    if job.model != model:
        raise bad_request(
            f"{PARAM}: {ref} was trained on {job.model!r}, this job's model is {model!r}; use the same base model",
            PARAM,
        )
    return Source(ref=ref, job=job)


def continued_from_model(db: Session, user: User, body: CreateJobRequest) -> CreateJobRequest:
    """A body whose `model` is a fine-tuned model name, as the same job asked with from_checkpoint:
    `model` becomes the base it was trained on and `from_checkpoint` its job or checkpoint id."""
    if not is_fine_tuned_name(body.model):
        return body
    found = find_fine_tuned(db, user, body.model)
    if found is None:  # an unreadable job's model reads as unknown, as it does to chat
        raise bad_request(f"model: no fine-tuned model {body.model!r} (a succeeded job's fine_tuned_model or a "
                          "stored checkpoint's fine_tuned_model_checkpoint)", "model", "model_not_found")
    if body.from_checkpoint and body.from_checkpoint != found.ref:
        raise bad_request(f"{PARAM}: {body.from_checkpoint} is not the weights of model {body.model!r} "
                          f"({found.ref}); give one of the two", PARAM)
    return body.model_copy(update={"model": found.job.model, "from_checkpoint": found.ref})
