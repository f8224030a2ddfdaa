"""Wire objects. They follow OpenAI's fine-tuning API where it has an answer; tuneq's additions
are plain extra fields, so OpenAI clients ignore them and the SDK reaches them as attributes."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, create_model

from trainer.integration_settings import Integration
from trainer.spec import METHOD_SETTINGS, METHODS, Hyperparameters, JobSpec

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """OpenAI's cursor page: the next page is `?after=<last_id>` while has_more is true."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    sha256: str
    validation: dict[str, Any] = Field(description="The per-line validation report of trainer.data.validate.validate_file.")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class JobErrorOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str | None = None
    message: str
    param: str | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    seed: int
    trained_tokens: int | None
    error: JobErrorOut | None
    result_files: list[str]
    estimated_finish: int | None
    integrations: list[Integration] = Field(default_factory=list, description="As the job was created with.")
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    # tuneq's extensions
    user_provided_suffix: str | None
    priority: int
    gpus: int
    progress: dict[str, Any]
    metrics: dict[str, Any]
    started_at: int | None
    nodes: int = 1  # hosts the job spans; gpus counts each host's
    host: str | None = None  # the host that runs the job, or ran it last (across hosts: the leader)
    hosts: list[str] | None = None  # a job across hosts while it runs: every host, the leader first
    gpu: dict[str, Any] | None = None  # that host's GPUs: name, memory_gib, count
    # Predicted peak GPU memory (the planner's, at creation) next to the measured one.
    plan: dict[str, Any] | None = None


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    # OpenAI's values alone: a typed client (the SDK's own models, a generated one) rejects others.
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None
    # tuneq's extension: what happened (status, checkpoint, metrics, validation, eval, retry, ...),
    # finer than `type`, which says only whether `data` holds a step's metrics.
    kind: str


class CheckpointOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class ArtifactOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.artifact"] = "fine_tuning.job.artifact"
    created_at: int
    fine_tuning_job_id: str
    name: str
    kind: str
    bytes: int
    sha256: str


# What no user owns (base models, a job without an owner) belongs to this organization.
ORGANIZATION = "tuneq"


def owner_of(owner_id: str | None) -> str:
    """A job's organization_id and its fine-tuned model's owned_by: whoever trained it."""
    return owner_id or ORGANIZATION


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = ORGANIZATION


def _settings_fields(name: str) -> str:
    """The field names of a settings field of the spec (`lora`: r, alpha, ...)."""
    ann = JobSpec.model_fields[name].annotation
    model = next(t for t in (ann, *get_args(ann)) if isinstance(t, type) and issubclass(t, BaseModel))
    return ", ".join(model.model_fields)


def _method_help() -> str:
    settings = []
    for method, names in METHOD_SETTINGS.items():
        if names:
            own = _settings_fields(names[0])
            extra = "".join(f"; {n}: {{{_settings_fields(n)}}}" for n in names[1:])
            settings.append(f"{method}: {own}{extra}")
    return (" | ".join(repr(m) for m in METHODS) + " | 'auto', OpenAI's {'type': 'supervised', 'supervised': "
            "{'hyperparameters': {...}}}, or {'type': <method>, <method>: {settings, 'hyperparameters'}}. Settings: "
            + "; ".join(settings) + ". Preference tuning: {'type': 'dpo' | 'simpo' | 'orpo', <type>: {'hyperparameters': "
            "{'beta': number | 'auto', 'gamma' (simpo), ...}, 'method': <method> | 'auto', <settings field>: {...}}} "
            "on preference files; 'supervised' takes 'method' and settings the same way.")


class _JobRequest(BaseModel):
    """The fields of a job body that OpenAI defines or that name things by id."""

    # strict: `"gpus": true` is not one GPU, nor `"priority": "5"` a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(..., min_length=1, max_length=512, description=(
        "A name from GET /v1/models: a base model, or a fine-tuned model (a checkpoint's name too) to "
        "continue training, as from_checkpoint does; the job then trains that model's base."))
    training_file: str = Field(..., min_length=1, description="A file id from POST /v1/files.")
    validation_file: str | None = Field(None, description="A file id from POST /v1/files.")
    seed: Annotated[int | None, *Hyperparameters.model_fields["seed"].metadata] = Field(
        None, description="The same as hyperparameters.seed.")
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="n_epochs, batch_size, learning_rate_multiplier ('auto' allowed) and every field of "
        "hyperparameters of the job spec: " + ", ".join(Hyperparameters.model_fields) + ".",
    )
    method: str | dict[str, Any] | None = Field(None, description=_method_help())
    from_checkpoint: str | None = Field(
        None, min_length=1, max_length=64,
        description="Continue from a previous job (ftjob-…: its final weights) or checkpoint (ftckpt-…); "
        "without a method, that job's method and settings are used.",
    )
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    gpus: int = Field(1, ge=1, le=64, description="GPUs the job needs on each of its hosts (see nodes).")
    metadata: dict[str, str] | None = None


# JobSpec fields the request shapes OpenAI's way (above) or under `method`; every other field of
# the spec is a request field of its own, with the spec's type, limits and description, so a new
# spec field reaches the API without an edit here.
SHAPED = {"model", "method", "hyperparameters", "init_from", "training_file", "validation_file",
          "objective", "preference", *(name for names in METHOD_SETTINGS.values() for name in names)}
SPEC_FIELDS = tuple(name for name in JobSpec.model_fields if name not in SHAPED)
# Files are named by id in a request; the worker turns ids into the paths the spec holds.
_BY_ID = {
    "forgetting_file": "A file id of general held-out text; its loss before and after training measures forgetting.",
    "mix": "Replay/general data mixed into training: [{'file': file id, 'weight': examples per training example}].",
}


def _optional(name: str) -> tuple[Any, None]:
    """A spec field as an optional request field (left out: the spec's default)."""
    f = JobSpec.model_fields[name]
    return Annotated[f.annotation | None, *f.metadata, Field(description=_BY_ID.get(name, f.description))], None


CreateJobRequest = create_model(
    "CreateJobRequest", __base__=_JobRequest, __module__=__name__,
    __doc__="OpenAI's job body plus tuneq's fields (send those with the SDK's `extra_body`).\n\n"
    "Every tuneq field is a field of trainer.spec.JobSpec, the one definition of a job, checked there.",
    **{name: _optional(name) for name in SPEC_FIELDS},
)


class Health(BaseModel):
    status: Literal["ok", "error"]
    database: str
    redis: str


class Readiness(BaseModel):
    status: Literal["ready", "starting"]
    waiting_on: list[str]  # api, checking_child, workers
    checking_child: str  # ready, warming, failed, off
    workers: int  # registered (counted only when asked for with ?workers=N)
    workers_ready: int  # of them, those whose standby trainers and trainer template are all ready
    standbys_wanted: int  # standby trainers those workers keep
    standbys_ready: int  # of them, those done importing
    templates_importing: int = 0  # trainer templates of those workers still importing
    kernels_warming: int = 0  # kernel warm-ups (worker/kernel_warmup.py) of those workers still running
    api_warmup_s: float | None = None
    registry: str | None = None  # why the worker registry could not be read


class UserOut(BaseModel):
    id: str
    object: Literal["user"] = "user"
    name: str
    role: Literal["admin", "member"]
    team: str | None = Field(None, description="The team's name.")
    max_priority: int | None = Field(None, description="The user's own priority cap; null: the team's.")
    priority_cap: int = Field(description="The highest priority this user's jobs may ask for now.")
    created_at: int


class PriorityCap(BaseModel):
    """An admin's grant: the highest job priority a team or user may ask for; null removes it."""

    # strict: `true` is not a cap of 1 (which would let the user preempt other teams), nor "5" or 2.0 a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_priority: int | None = Field(..., ge=-100, le=100)


class TeamOut(BaseModel):
    id: str
    object: Literal["team"] = "team"
    name: str
    max_priority: int | None = Field(None, description="The members' priority cap; null: the service's default band.")


class CreateUserRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200, description="Unique; letters, digits, '.', '_', '@', '-'.")
    role: Literal["admin", "member"] = "member"
    team: str | None = Field(None, min_length=1, max_length=200, description="Created on first use.")


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, description="A label, e.g. where the key is used.")


class KeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    user_id: str
    name: str
    prefix: str = Field(description="The non-secret head of the token.")
    created_at: int
    revoked_at: int | None


class CreatedKeyOut(KeyOut):
    key: str = Field(description="The token. It is shown only in this response; store it now.")
