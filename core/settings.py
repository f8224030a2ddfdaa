"""Service settings, read from the environment (`TUNEQ_*`) or a `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQ_", env_file=".env", extra="ignore")

    home: Path = Field(Path("var"), description="Root of the embedded stack's state.")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file under home.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker.")
    artifact_dir: Path | None = Field(None, description="Where files and artifacts are stored; default home/artifacts.")
    work_dir: Path | None = Field(None, description="Scratch space of running jobs; default home/work.")
    # Artifact storage (issue 11). Several hosts share one store only through S3: a local
    # directory is seen by the API and the workers of one host alone.
    storage_url: str = Field(
        "", description="Where files and artifacts live: '' or file:///dir (local), or s3://bucket/prefix.",
        pattern=r"^$|^file://|^s3://[^/]+",
    )
    storage_cache_dir: Path | None = Field(
        None, description="Local copies of stored files that training reads (S3 only); default home/storage-cache."
    )
    s3_endpoint_url: str = Field("", description="S3-compatible endpoint, e.g. http://minio:9000; '' for AWS.")
    s3_region: str = Field("us-east-1", description="Region of the bucket.")
    s3_access_key_id: str = Field("", description="'' to use boto3's own chain (AWS_* variables, instance role).")
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="Secret of s3_access_key_id.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "path", description="'path' suits MinIO and most self-hosted stores; AWS takes any."
    )
    # Connection pool of PostgreSQL (SQLite has none to tune). pre-ping and recycle are what let
    # API and workers survive a database restart without serving dead connections.
    db_pool_size: int = Field(5, ge=1, le=1000, description="Connections kept open per process.")
    db_max_overflow: int = Field(10, ge=0, le=1000, description="Extra connections opened under load.")
    db_pool_timeout_s: float = Field(30.0, gt=0, description="Wait for a free pooled connection before failing.")
    db_pool_recycle_s: int = Field(
        1800, ge=-1, description="Reopen connections older than this (firewalls and proxies drop idle ones); -1: never."
    )
    db_pool_pre_ping: bool = Field(True, description="Test a pooled connection before use; replaces one the server dropped.")
    db_connect_timeout_s: int = Field(5, ge=1, le=600, description="Give up on one connection attempt after this.")
    db_connect_retry_s: float = Field(
        10.0, ge=0, description="Keep retrying a refused connection this long (rides out a database restart)."
    )
    model_roots: list[Path] = Field(default_factory=list, description="Directories whose subfolders are base models.")
    allow_hub_models: bool = Field(False, description="Accept hub ids that are not under a model root.")
    visibility_timeout_s: int = Field(3600, ge=1, description="Broker re-delivery timeout of unacked tasks.")
    heartbeat_s: float = Field(5.0, gt=0, description="How often a running worker renews its lease.")
    lease_ttl_s: float = Field(60.0, gt=0, description="A lease older than this is dead and its job re-queued.")
    worker_id: str = Field("", description="Name of this worker; default host:pid.")
    accelerate_launch: bool = Field(True, description="Run the trainer under `accelerate launch`.")
    dist_timeout_s: float = Field(
        600.0, gt=0, le=86_400,
        description="A multi-GPU job's process waits this long in a collective for a peer before it fails.",
    )
    # Reliability (issue 3). A host's devices are GPUs, or on a CPU host the worker's job slots.
    gpus: int | None = Field(None, ge=0, le=64, description="GPUs of this host; default: counted by nvidia-smi/torch.")
    host_id: str = Field("", description="Name of this host for GPU leases; default: the hostname.")
    gpu_lock_dir: Path | None = Field(None, description="Per-GPU lock files shared by a host's workers; default home/gpu-locks.")
    registry_ttl_s: float = Field(15.0, gt=0, description="A worker not seen for this long is no longer registered.")
    dispatch_interval_s: float = Field(1.0, gt=0, description="How often a worker re-sends queued jobs the broker may have lost.")
    max_attempts: int = Field(5, ge=1, le=100, description="Runs of a job after infrastructure failures before it fails.")
    retry_backoff_s: float = Field(5.0, ge=0, description="Wait before the first retry; doubles with each further one.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest accepted upload.")
    # Serving under load: what one API process accepts before it answers 503 at once rather than
    # queue work it cannot do in time, and how long a client may take to send a request.
    max_json_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest JSON request body (job specs, admin calls).")
    api_max_inflight: int = Field(
        64, ge=1, le=100_000, description="Requests one API process works on at once (event streams apart); more get 503."
    )
    api_max_streams: int = Field(1000, ge=1, le=100_000, description="Open event streams per API process; more get 503.")
    api_header_timeout_s: float = Field(10.0, gt=0, le=600, description="A request's headers must arrive within this.")
    api_body_timeout_s: float = Field(30.0, gt=0, le=3600, description="A request body may pause this long between bytes.")
    api_keep_alive_s: int = Field(5, ge=1, le=600, description="Idle keep-alive connections close after this.")
    data_check_inline_bytes: int = Field(
        256 * 1024, ge=0, description="A job whose files are this small in all is checked while it is created; "
        "larger ones wait in validating_files while a child process tokenizes them.",
    )
    page_limit_max: int = Field(100, ge=1, le=10_000, description="Largest page size of list routes.")
    # Limits per user on a shared service. Admins are held to them too: a script with an admin
    # key can fill a cluster as easily as anyone's.
    max_active_jobs_per_user: int = Field(10, ge=1, description="Jobs not yet finished (queued, running, paused) per user.")
    max_gpus_per_user: int = Field(8, ge=1, description="GPUs that one user's unfinished jobs may ask for in total.")
    job_create_rate: int = Field(30, ge=1, description="Jobs one user may create per job_create_window_s.")
    job_create_window_s: int = Field(60, ge=1, le=86_400, description="Window of the job creation rate limit.")
    max_examples_per_file: int = Field(1_000_000, ge=1, description="Examples (valid lines) an uploaded file may hold.")
    max_tokens_per_file: int = Field(
        200_000_000, ge=1, description="Tokens a training or validation file may hold, counted with the job's tokenizer."
    )
    # Planner (issue 7): what a job is planned against before any GPU is touched. The API host
    # usually has no GPU, so the worker hosts' memory and speed are declared here.
    plan_gpu_memory_gib: float = Field(80.0, gt=0, description="Memory per GPU that job plans must fit in, in GiB.")
    plan_gpu_tflops: float = Field(790.0, gt=0, description="bf16 dense peak per GPU in TFLOP/s (790: measured H200).")
    trust_remote_code_models: list[str] = Field(
        default_factory=list,
        description="Hub ids or absolute model directories whose own Python code may run (trust_remote_code). "
        "Set by an admin; a job can never ask for it.",
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'tuneq.db').resolve()}"

    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.home / "artifacts").resolve()

    def resolved_storage_cache_dir(self) -> Path:
        return (self.storage_cache_dir or self.home / "storage-cache").resolve()

    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()


@lru_cache
def get_settings() -> Settings:
    return Settings()
