"""SQLAlchemy 2 tables. The schema itself is created only by Alembic migrations."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> float:
    return time.time()


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Team(Base):
    """Members of a team may read each other's jobs (never change them)."""

    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("team"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # The highest job priority its members may ask for (core.policy); None: the service's default.
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class User(Base):
    """Jobs and files carry an owner; the role decides who may see everything."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("user"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(20), default="member")  # admin | member
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), nullable=True, index=True)
    # A cap of the user's own (a team lead's, say), over the team's; None: the team's.
    max_priority: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class ApiKey(Base):
    """A bearer token. Only its sha256 is stored: a leaked database does not leak keys."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    # The non-secret head of the token, so a listing can say which key is which.
    prefix: Mapped[str] = mapped_column(String(40))
    token_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file"))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40), default="fine-tune")
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(20), default="processed")  # processed | error | deleted
    sha256: Mapped[str] = mapped_column(String(64), default="")
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Job(Base):
    __tablename__ = "jobs"
    # The scheduler reads each user's oldest queued jobs in this order (core/scheduling.py `_read`).
    __table_args__ = (Index("ix_jobs_queue_order", "status", "priority", "owner_id", "created_at", "id"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftjob"))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True)
    status: Mapped[str] = mapped_column(String(20), default="validating_files", index=True)
    model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(20))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # OpenAI's job metadata: up to 16 string pairs the caller tags a job with and filters lists by.
    # (The attribute cannot be `metadata`: SQLAlchemy's declarative base owns that name.)
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON(none_as_null=True), nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # OpenAI's result_files: ids of the files (purpose fine-tune-results) written when it succeeded.
    result_files: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Control flags the worker polls: the API never signals a process itself.
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The job a preemption paused this one for (it goes straight back to the queue). A column of
    # its own: kept in `progress`, the worker's event pump rewrote that JSON from a copy read just
    # before the preemption committed, the marker was lost and the job stayed paused (lent H200).
    preempted_by: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # When the trainer finished writing the final weights: an attempt that finds it set publishes
    # them instead of training again (the worker that trained may be lost while publishing).
    trained_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The host whose worker runs the job now, or ran it last (TUNEQ_HOST_ID): shown with its status.
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # The least memory per GPU the job's plan fits in (None: not planned, or not checked): a worker
    # takes the job only if its GPUs have this much. An out-of-memory on a host raises it above
    # that host's, so the job moves to a larger GPU.
    min_gpu_memory_gib: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The GPUs of the host it runs (or last ran) on: {"name", "memory_gib", "count"}.
    gpu: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The lease: the database, not the broker, decides who runs a job.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Fair share: the time up to which this job's GPUs were charged to its owner and team
    # (core/fairshare.py); set while it holds GPUs, None otherwise.
    usage_charged_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Against starvation (core/scheduling.py): since when jobs behind this queued one in the queue
    # order have started on hosts it fits but whose free GPUs were too few for it, and the host held
    # for it once that lasted `reserve_after_h`. Both are cleared when it starts.
    passed_over_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    reserved_host: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)

    @property
    def nodes(self) -> int:
        """Hosts the job spans (spec `nodes`); `gpus` counts the GPUs of each."""
        return int((self.spec or {}).get("nodes") or 1)

    @property
    def total_gpus(self) -> int:
        return self.gpus * self.nodes

    events: Mapped[list[JobEvent]] = relationship(back_populates="job", cascade="all, delete-orphan")


class GpuUsage(Base):
    """Fair share (core/fairshare.py): decayed GPU-hours of one user ("user:<id>") or team ("team:<id>"), as of `at`."""

    __tablename__ = "gpu_usage"
    principal: Mapped[str] = mapped_column(String(60), primary_key=True)
    gpu_hours: Mapped[float] = mapped_column(Float, default=0.0)
    at: Mapped[float] = mapped_column(Float, default=now)


class JobEvent(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, default=lambda: new_id("ftevent"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[float] = mapped_column(Float, default=now)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(20), default="message")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    job: Mapped[Job] = relationship(back_populates="events")
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ftckpt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))  # where the host that wrote it keeps it
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # The folder of its files (and manifest.json) in the shared store. Only an uploaded
    # checkpoint is resumed, continued from or listed: any host can fetch it.
    storage_key: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    uploaded_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    host: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Artifact(Base):
    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("art"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))  # relative path inside the job's artifact set
    kind: Mapped[str] = mapped_column(String(20), default="file")  # file | archive | manifest | checkpoint
    storage_key: Mapped[str] = mapped_column(String(1024))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)


class GangMember(Base):
    """One host's part in a job across hosts (spec `nodes` above 1), for one lease attempt.

    The leader inserts every row of a gang in the transaction that leases the job, so a host is
    in at most one gang (unique `host`) and no host waits holding GPUs for others that are busy.
    Rows go when the job leaves `running` (core.states.transition), which frees the hosts.
    """

    __tablename__ = "gang_members"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: the leader, whose rank 0 writes events
    host: Mapped[str] = mapped_column(String(200), unique=True)
    attempt: Mapped[int] = mapped_column(Integer)  # the job's lease attempt this gang serves
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # set when a worker of host joins
    # Set on the leader's row once it has chosen the checkpoint to resume: the others start only then.
    endpoint: Mapped[str | None] = mapped_column(String(300), nullable=True)  # host:port of the rendezvous
    ready: Mapped[bool] = mapped_column(Boolean, default=False)
    resume_checkpoint: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    joined_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)  # its trainer's, once it ended


class GangClaim(Base):
    """A host held for a queued job across hosts while lower-priority jobs there pause for it
    (core/gang_claims.py). One claim per host (`host` is the key): a job claims all its hosts in
    one transaction or none. Rows go when the job leaves `queued` (core.states.transition)."""

    __tablename__ = "gang_claims"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # The claimer's priority when it claimed: only a job of higher priority takes the host over.
    priority: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float, default=now)
