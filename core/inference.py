"""Chat completions: what the API and the inference servers share.

A request travels through Redis, never through the database: the API pushes it (JSON) onto the
list QUEUE, an inference server (`python -m worker.serve`) pops it, and writes its answer as
entries of a Redis stream of the request's own (REPLY + request id): one `start` (the prompt's
token count), `delta`s of text, then `end` (finish reason and usage) or `error`. A stream, not
pub/sub, so nothing is lost when the server writes before the API reads. The API reads the
stream with blocking XREADs on its event loop and holds no thread and no database connection
while the answer is produced. The stream expires REPLY_TTL_S after its last entry.

Model names are resolved here, with a short database read, into a Target: the base model, and
the trained weights to put on it (a job's final weights or one of its checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.identity import can_read_job
from core.model_roots import ModelNotFound, resolve_model
from core.models import Checkpoint, Job, User
from core.settings import Settings

QUEUE = "tuneq:infer:queue"
REPLY = "tuneq:infer:reply:"
CANCEL = "tuneq:infer:cancel:"
SERVERS = "tuneq:server:"
# How an inference server names itself in a GPU's lock file: no job id, never preempted.
SERVER_OWNER = "inference:"
REPLY_TTL_S = 120

_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_CKPT = re.compile(r"^ckpt-step-(\d{1,12})$")


def fine_tuned_model_name(job: Job) -> str:
    """The `fine_tuned_model` a job gets when it succeeds, in OpenAI's form ft:base:suffix:id."""
    base = job.model.rstrip("/")
    if os.path.isabs(base):
        base = Path(base).name  # a local directory: its folder name, not where this host keeps it
    return f"ft:{base}:{job.suffix or 'tuneq'}:{job.id}"


def checkpoint_model_name(job: Job, step: int) -> str:
    """A checkpoint's `fine_tuned_model_checkpoint`: the job's model name and the step. The same
    while the job trains and after it succeeded, so a name read from a running job keeps working."""
    return f"{job.fine_tuned_model or fine_tuned_model_name(job)}:ckpt-step-{step}"


@dataclass(frozen=True)
class Target:
    """What an inference server loads for one model name."""

    model: str  # the name the caller asked for, echoed in the answer
    base: str  # the base model's directory (or a hub id), as a worker loads it
    weights: str | None = None  # None: the base itself; else a job id or a checkpoint id
    context: int | None = None  # the base's context length in tokens, when known here


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True)
class FineTuned:
    """What a fine-tuned model name stands for: a succeeded job's final weights, or one of its
    stored checkpoints."""

    job: Job
    checkpoint: Checkpoint | None = None

    @property
    def ref(self) -> str:
        """The id a worker turns into weights (a job's or a checkpoint's), as from_checkpoint takes."""
        return self.checkpoint.id if self.checkpoint is not None else self.job.id

    @property
    def created(self) -> float:
        if self.checkpoint is not None:
            return self.checkpoint.created_at
        return self.job.finished_at or self.job.created_at


def is_fine_tuned_name(name: str) -> bool:
    return name.startswith("ft:")


def find_fine_tuned(db: Session, user: User, name: str) -> FineTuned | None:
    """The job (and checkpoint) of a fine-tuned model name (`fine_tuned_model`, or a checkpoint's
    `fine_tuned_model_checkpoint`), or None: unknown names and models of jobs the caller may not
    read are alike, so another user's model cannot be confirmed to exist."""
    parts = name.split(":")
    if len(parts) < 2 or not is_fine_tuned_name(name):
        return None
    job_id, step = parts[-1], None
    if (m := _CKPT.match(parts[-1])) and len(parts) >= 3:
        job_id, step = parts[-2], int(m.group(1))
    if not _JOB_ID.match(job_id):
        return None
    job = db.get(Job, job_id)
    if job is None or not can_read_job(db, user, job):
        return None
    if step is None:
        ok = job.status == states.SUCCEEDED and job.fine_tuned_model == name
        return FineTuned(job) if ok else None
    ck = db.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step,
                                            Checkpoint.uploaded_at.is_not(None)).order_by(Checkpoint.created_at.desc()).limit(1))
    if ck is None or checkpoint_model_name(job, step) != name:
        return None
    return FineTuned(job, ck)


def resolve_target(db: Session, user: User, name: str, settings: Settings) -> Target:
    """The Target of `name` (a base model or a fine-tuned one), or UnknownModel."""
    if is_fine_tuned_name(name):
        found = find_fine_tuned(db, user, name)
        if found is None:
            raise UnknownModel(name)
        # The base the job trained on, as its workers loaded it (admission resolved the name).
        base = (found.job.spec or {}).get("model") or found.job.model
        return Target(model=name, base=base, weights=found.ref, context=context_length(base))
    try:
        base = resolve_model(name, settings)
    except ModelNotFound:
        raise UnknownModel(name) from None
    return Target(model=name, base=base, context=context_length(base))


def context_length(model_path: str) -> int | None:
    """max_position_embeddings of a local model directory; None for a hub id or no such field."""
    config = Path(model_path) / "config.json"
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


@dataclass
class ChatRequest:
    """One request on the queue: the target, the prompt and how to sample."""

    id: str
    target: Target
    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    deadline: float  # unix time after which no server should start it (the API stopped waiting)

    def dumps(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def loads(cls, raw: str | bytes) -> ChatRequest:
        data = json.loads(raw)
        data["target"] = Target(**data["target"])
        return cls(**data)


def server_entries(client: Any) -> list[dict[str, Any]]:
    """The live inference servers (registry keys with a TTL, like the workers')."""
    out = []
    for key in client.scan_iter(SERVERS + "*", count=100):
        raw = client.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def register_server(client: Any, server_id: str, ttl_s: float, **info: Any) -> None:
    client.set(SERVERS + server_id, json.dumps({"server_id": server_id, "time": time.time(), **info}),
               ex=max(1, math.ceil(ttl_s)))
