"""A job's integrations: OpenAI's `integrations` list, `{"type": "wandb", "wandb": {...}}`.

tuneq's trainer writes a job with a wandb integration as an offline Weights & Biases run
(trainer.tracking) into the job's work directory; the worker publishes it as the artifact
`wandb.tar.gz`, and `wandb sync` uploads it wherever the user has an account. Part of
trainer.spec.JobSpec; kept here so that the spec stays readable.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from trainer.method_settings import StrictModel
from trainer.vocabulary import INTEGRATION_TYPES, IntegrationType

# W&B's own limits on names: a project or entity has at most 128 characters and none of these.
WANDB_NAME_CHARS = 128
WANDB_FORBIDDEN = set('/\\#?%:')
WANDB_TAG_CHARS = 64
MAX_WANDB_TAGS = 64
# A request lists each type at most once (check_integrations); the bound keeps a bad one short.
MAX_INTEGRATIONS = 8


def _wandb_name(value: str | None) -> str | None:
    if value is not None and (bad := sorted({c for c in value if c in WANDB_FORBIDDEN or not c.isprintable()})):
        raise ValueError(f"must not contain {' '.join(repr(c) for c in bad)}")
    return value


class WandbSettings(StrictModel):
    project: str = Field(..., min_length=1, max_length=WANDB_NAME_CHARS, description="The W&B project of the run.")
    name: str | None = Field(
        None, min_length=1, max_length=WANDB_NAME_CHARS, description="The run's display name (default: the job id)."
    )
    entity: str | None = Field(
        None, min_length=1, max_length=WANDB_NAME_CHARS,
        description="The W&B team or user the run belongs to (default: the account that syncs it).",
    )
    tags: list[str] = Field(
        default_factory=list, max_length=MAX_WANDB_TAGS,
        description=f"Tags of the run, up to {WANDB_TAG_CHARS} characters each; tuneq adds tuneq/finetune and "
        "tuneq/<job id>.",
    )

    _names = field_validator("project", "entity")(_wandb_name)

    @field_validator("tags")
    @classmethod
    def _tag_lengths(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not 1 <= len(tag) <= WANDB_TAG_CHARS:
                raise ValueError(f"tags are 1 to {WANDB_TAG_CHARS} characters, got {len(tag)} ({tag[:20]!r})")
        return tags


class Integration(StrictModel):
    type: IntegrationType = Field(..., description=" | ".join(INTEGRATION_TYPES) + ".")
    # Required while wandb is the only type; another type would make it optional and check that
    # the body of the given type is there.
    wandb: WandbSettings = Field(..., description="The run's project, name, entity and tags.")


def check_integrations(integrations: list[Integration]) -> None:
    """One integration of each type: two W&B runs of one job would be the same curves twice."""
    seen: set[str] = set()
    for k, integration in enumerate(integrations):
        if integration.type in seen:
            raise ValueError(f"integrations[{k}].type: one {integration.type!r} integration per job")
        seen.add(integration.type)
