"""Wire objects. They follow OpenAI's fine-tuning API where it has an answer; tuneq's additions
are plain extra fields, so OpenAI clients ignore them and the SDK reaches them as attributes."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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
    validation: dict[str, Any] = Field(description="The per-line validation report of trainer.data.validate_file.")


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
    integrations: list[Any] = []
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    # tuneq's extensions
    user_provided_suffix: str | None
    priority: int
    gpus: int
    progress: dict[str, Any]
    metrics: dict[str, Any]
    started_at: int | None
    host: str | None = None  # the host that runs the job, or ran it last
    # Predicted peak GPU memory (the planner's, at creation) next to the measured one.
    plan: dict[str, Any] | None = None


class EventOut(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


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


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneq"


class CreateJobRequest(BaseModel):
    """OpenAI's job body plus tuneq's fields (send those with the SDK's `extra_body`).

    hyperparameters, method and schedule are checked by trainer.spec.JobSpec, the one definition
    of a job, so the limits live in one place.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=512, description="A name from GET /v1/models.")
    training_file: str = Field(..., min_length=1, description="A file id from POST /v1/files.")
    validation_file: str | None = Field(None, description="A file id from POST /v1/files.")
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="n_epochs, batch_size, learning_rate_multiplier ('auto' allowed) and every field of "
        "trainer.spec.Hyperparameters (learning_rate, max_steps, gradient_accumulation_steps, ...).",
    )
    method: str | dict[str, Any] | None = Field(
        None,
        description="'full' | 'lora' | 'qlora' | 'ia3' | 'prefix' | 'freeze', OpenAI's "
        "{'type': 'supervised', 'supervised': {...}}, or {'type': <method>, <method>: {settings, 'hyperparameters'}}: "
        "lora/qlora take r, alpha, dropout, target_modules, use_dora, use_rslora, loraplus_lr_ratio (qlora also "
        "quantization: {bits: 4|8}); ia3 target_modules, feedforward_modules; prefix num_virtual_tokens; "
        "freeze trainable_layers (from the top).",
    )
    schedule: dict[str, Any] | None = Field(None, description="trainer.spec.Schedule.")
    gradient_checkpointing: bool | None = None
    precision: str | None = None
    data_format: str | None = Field(None, description="auto | chat | alpaca | prompt_completion | text.")
    train_on_inputs: bool | None = Field(None, description="Also train on prompts (default: false; true for text).")
    packing: bool | None = Field(None, description="Pack short examples into full rows of max_seq_len.")
    mix: list[dict[str, Any]] | None = Field(
        None, description="Replay/general data mixed into training: [{'file': file id, 'weight': examples per training example}]."
    )
    forgetting_file: str | None = Field(
        None, description="A file id of general held-out text; its loss before and after training measures forgetting."
    )
    optimizer: str | None = Field(None, description="adamw | adamw_fused | adamw_8bit | paged_adamw | paged_adamw_8bit.")
    speed: str | None = Field(
        None, description="lean (gradient checkpointing, least memory) | balanced (only the bottom checkpoint_layers "
        "layers) | fast | auto (the planner picks).")
    checkpoint_layers: int | None = Field(None, ge=0, le=1024, description="speed balanced: decoder layers checkpointed, from the bottom.")
    checkpoint_offload: bool | None = Field(
        None, description="Checkpointed layers' inputs wait in pinned CPU memory between forward and backward "
        "(less GPU memory, PCIe copies that overlap compute); needs speed lean or balanced.")
    optimizer_in_backward: bool | None = Field(
        None, description="Update each layer as soon as its gradients exist and free them (less peak memory); "
        "needs max_grad_norm 0, gradient_accumulation_steps 1, optimizer adamw, one GPU.")
    full_precision: str | None = Field(None, description="Full fine-tuning's weights: fp32_master (default) | bf16.")
    strategy: str | None = Field(None, description="Several GPUs: auto | ddp | fsdp (full and freeze only).")
    export: dict[str, Any] | None = Field(
        None, description="{'merged': true} also exports the adapter merged into the base (merged.tar.gz)."
    )
    from_checkpoint: str | None = Field(
        None, min_length=1, max_length=64,
        description="Continue from a previous job (ftjob-…: its final weights) or checkpoint (ftckpt-…); "
        "without a method, that job's method and settings are used.",
    )
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first.")
    gpus: int = Field(1, ge=1, le=64, description="GPUs of one host the job needs.")
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None


class Health(BaseModel):
    status: Literal["ok", "error"]
    database: str
    redis: str


class UserOut(BaseModel):
    id: str
    object: Literal["user"] = "user"
    name: str
    role: Literal["admin", "member"]
    team: str | None = Field(None, description="The team's name.")
    created_at: int


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
