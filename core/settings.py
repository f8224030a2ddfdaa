"""Service settings, read from the environment (`TUNEQ_*`) or a `.env` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQ_", env_file=".env", extra="ignore")

    home: Path = Field(Path("var"), description="Folder for local state: the SQLite database, models of `tuneq up`, work, artifacts and locks, unless set apart.")
    database_url: str = Field("", description="SQLAlchemy URL of the database, e.g. postgresql+psycopg://user:pass@host/tuneq. Empty: a SQLite file home/tuneq.db (one host only).")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL: the Celery broker, the worker registry and the job-creation rate limit.")
    artifact_dir: Path | None = Field(None, description="Folder of uploaded files and job artifacts when storage is local. Empty: home/artifacts.")
    work_dir: Path | None = Field(None, description="Scratch folder of running jobs on this host (spec, events, checkpoints). Empty: home/work.")
    # Artifact storage. Several hosts share one store only through S3: a local
    # directory is seen by the API and the workers of one host alone.
    storage_url: str = Field(
        "", description="Where uploads and artifacts live: empty or file:///dir for a local folder (one host), s3://bucket/prefix for an S3-compatible store that several hosts share.",
        pattern=r"^$|^file://|^s3://[^/]+",
    )
    storage_cache_dir: Path | None = Field(
        None, description="Local copies of stored files that the trainer and tokenizer read (S3 only); safe to empty when no job runs. Empty: home/storage-cache."
    )
    s3_endpoint_url: str = Field("", description="Endpoint of an S3-compatible store, e.g. http://minio:9000. Empty: AWS S3.")
    s3_region: str = Field("us-east-1", description="Region of the S3 bucket.")
    s3_access_key_id: str = Field("", description="Access key of the store. Empty: boto3 finds credentials itself (AWS_* variables, instance role).")
    s3_secret_access_key: SecretStr = Field(SecretStr(""), description="Secret key that goes with TUNEQ_S3_ACCESS_KEY_ID.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "path", description="How bucket names go into URLs: path suits MinIO and most self-hosted stores; AWS takes any."
    )
    # Connection pool of PostgreSQL (SQLite has none to tune). pre-ping and recycle are what let
    # API and workers survive a database restart without serving dead connections.
    db_pool_size: int = Field(5, ge=1, le=1000, description="Database connections each process (an API process or a worker) may hold; it opens them as it needs them and keeps them open.")
    db_max_overflow: int = Field(10, ge=0, le=1000, description="Further connections a process may open under load, beyond TUNEQ_DB_POOL_SIZE; kept open like the others once opened (closing them after each use made every burst open new ones).")
    db_pool_timeout_s: float = Field(30.0, gt=0, description="Seconds a request waits for a free pooled connection before it fails.")
    db_pool_recycle_s: int = Field(
        1800, ge=-1, description="Seconds after which a pooled connection is reopened, since firewalls and proxies drop idle ones; -1: never."
    )
    db_pool_pre_ping: bool = Field(True, description="Check each pooled connection before use and replace one the server dropped (needed to ride out a database restart). The check is a look at its socket; the server is asked only when it has sent something, as it does when it ends a connection.")
    db_connect_timeout_s: int = Field(5, ge=1, le=600, description="Seconds one attempt to connect to the database may take.")
    db_connect_retry_s: float = Field(
        10.0, ge=0, description="Seconds a refused database connection is retried, so a database restart is a pause rather than an error."
    )
    model_roots: list[Path] = Field(default_factory=list, description="Folders whose subfolders (org/name too) are the base models jobs may name. `tuneq up` uses home/models.")
    allow_hub_models: bool = Field(False, description="Also accept a plain org/name model hub id that is not under a model root (loaded from the Hugging Face cache).")
    visibility_timeout_s: int = Field(3600, ge=1, description="Seconds before the broker hands an unacknowledged task to another worker; the database lease still keeps a job from running twice.")
    heartbeat_s: float = Field(5.0, gt=0, description="Seconds between the renewals of a running job's lease by its worker.")
    lease_ttl_s: float = Field(60.0, gt=0, description="Seconds without a renewal after which a lease counts as dead and the reaper re-queues its job.")
    worker_id: str = Field("", description="Name of this worker in leases and the registry. Empty: hostname:pid.")
    accelerate_launch: bool = Field(True, description="Start multi-GPU trainers under `accelerate launch`; false starts them with torch.distributed.run instead. A one-GPU trainer is always started directly.")
    standby_trainers: int = Field(
        2, ge=0, le=16,
        description="Trainer processes each worker keeps started ahead of its jobs, with torch and the trainer already imported: a one-GPU job starts in one instead of a fresh interpreter (seconds sooner to its first step). They go to the GPUs the next jobs will get, one per GPU first; on a host with fewer GPUs than standbys, a GPU gets a second one, so that a job submitted as the last one ends finds one that finished its imports while that job ran. With TUNEQ_TRAINER_TEMPLATE on, only the jobs the template cannot take use them. 0: none; such jobs start a fresh process.",
    )
    trainer_template: bool = Field(
        True,
        description="Each worker keeps one process that imported the trainer and forks a one-process trainer for each job (milliseconds instead of the seconds of a fresh interpreter's imports). Jobs that need bitsandbytes (qlora, its optimizers, a base stored quantized) still take a standby trainer or a fresh process. false: no template.",
    )
    trainer_template_at_start: bool = Field(
        True,
        description="Start the trainer template with the worker, so that its imports are done before the first job arrives. false: start it for the worker's first job, which waits for those imports (about what a fresh trainer would take); for workers that often run no job at all.",
    )
    warm_kernels: bool = Field(
        True,
        description="On a GPU host, a worker that starts compiles the fast path's Triton kernels for the local models (python -m trainer warm-kernels, one short process on its first GPU) and counts as ready once that is done. Compiled kernels stay in Triton's on-disk cache (TRITON_CACHE_DIR, default ~/.triton/cache), so only a host's first start compiles; otherwise a host's first job of each model shape compiles them, seconds before its first step. false: no warm-up.",
    )
    dist_timeout_s: float = Field(
        600.0, gt=0, le=86_400,
        description="Seconds a process of a multi-GPU job waits for its peers in a collective before the job fails and is retried.",
    )
    # Jobs across hosts (spec `nodes`): the leader host's rank 0 listens for the other hosts' ranks.
    rendezvous_addr: str = Field("", description="Address at which the other hosts reach this one when it leads a job across hosts (its rank 0 listens there). Empty: the hostname.")
    rendezvous_ports: str = Field(
        "29400-29499", pattern=r"^\d{1,5}-\d{1,5}$",
        description="TCP ports (first-last) that a leader host picks a free one from for a job across hosts; the other hosts must reach them.",
    )
    gang_join_timeout_s: float = Field(
        120.0, gt=0, description="Seconds the hosts reserved for a job across hosts have to start their part before the job gives back every host's GPUs and waits in the queue again.",
    )
    # Reliability. A host's devices are GPUs, or on a CPU host the worker's job slots.
    gpus: int | None = Field(None, ge=0, le=64, description="GPUs of this host (on a CPU host: job slots). Empty: counted with nvidia-smi, else torch.")
    host_id: str = Field("", description="Name of this host in the worker registry; must differ between hosts. Empty: the hostname.")
    gpu_lock_dir: Path | None = Field(None, description="Folder of the per-GPU lock files that the workers of one host share. Empty: home/gpu-locks.")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GiB of memory this worker reports for each of its GPUs, in place of what nvidia-smi says. On a CPU worker it makes each job slot a GPU of this size, to try placement on one machine. Empty: as detected."
    )
    gpu_name: str = Field("", description="Name this worker reports for its GPUs with gpu_memory_gib. Empty: as detected (nvidia-smi), or 'simulated' on a CPU worker.")
    registry_ttl_s: float = Field(15.0, gt=0, description="Seconds after which a worker that stopped refreshing its registry entry drops out of it.")
    dispatch_interval_s: float = Field(1.0, gt=0, description="Seconds between a worker's passes that refresh its registry entry and re-send queued jobs whose message may be lost.")
    min_free_disk_gib: float = Field(
        10.0, ge=0, description="Free GiB the work folder's disk must keep: below it a worker takes no new job (running ones go on) and its registry entry says disk_full. 0: never refuse."
    )
    max_attempts: int = Field(5, ge=1, le=100, description="Runs a job gets when infrastructure fails under it (killed trainer, lost worker) before it is marked failed.")
    retry_backoff_s: float = Field(5.0, ge=0, description="Seconds before the first retry of such a job; doubles with each further retry, at most 300.")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest upload in bytes; a larger one is refused with 413 while it streams in.")
    api_docs: bool = Field(False, description="Serve /docs, Swagger UI loaded from a CDN under a Content-Security-Policy. Off by default: it shares its origin with /ui, which keeps the API key.")
    page_limit_max: int = Field(100, ge=1, le=10_000, description="Most items a page of a list route holds. A larger `limit` (up to 10,000, OpenAI's bound) gets a page this size with has_more set when there are more.")
    # Serving under load: what one API process takes on before it answers 503 at once rather than
    # queue work it cannot finish in time, and how long a client may take to send a request.
    max_json_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest JSON request body in bytes (job specs, admin calls); a larger one is refused with 413 before it is read."
    )
    api_max_inflight: int = Field(
        64, ge=1, le=100_000, description="Requests one API process works on at once, event streams apart; more answer 503 with Retry-After at once."
    )
    api_max_streams: int = Field(1000, ge=1, le=100_000, description="Open event streams per API process; more answer 503 with Retry-After.")
    api_header_timeout_s: float = Field(10.0, gt=0, le=600, description="Seconds within which a request's headers must arrive, else the connection is closed.")
    api_body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Seconds a request body may pause between bytes, else the connection is closed.")
    api_keep_alive_s: int = Field(5, ge=1, le=600, description="Seconds after which an idle keep-alive connection is closed.")
    api_queue_position_max_age_s: float = Field(
        1.0, ge=0, le=60, description="Seconds one reading of the queue's order serves the queue positions an API process shows, so pollers of queued jobs do not each read the queue; changes made through the same process show at once. 0 reads it per request.",
    )
    api_warm_child: bool = Field(
        True, description="Start the API's checking child (the process that tokenizes large files, see TUNEQ_DATA_CHECK_INLINE_BYTES) when the API starts, with its imports done and the tokenizers of the newest local base models loaded, instead of at the first large job. It holds those libraries' memory (hundreds of MB) for as long as the API runs.",
    )
    data_check_inline_bytes: int = Field(
        256 * 1024, ge=0, description="Bytes of a job's files up to which the creation request tokenizes them itself; larger ones leave the job in validating_files while a child process of the API checks them.",
    )

    # Limits per user on a shared service. Admins are held to them too: a script with an admin
    # key can fill a cluster as easily as anyone's.
    max_active_jobs_per_user: int = Field(10, ge=1, description="Unfinished jobs (queued, running, paused, ...) one user may have; more answers 403.")
    max_gpus_per_user: int = Field(8, ge=1, description="GPUs that one user's unfinished jobs may ask for in total; more answers 403.")
    max_gpu_hours_per_user: float = Field(2000.0, gt=0, description="GPU-hours, as the planner estimates them, that one user's unfinished jobs may book together; more answers 403.")
    min_checkpoint_every_minutes: float = Field(1.0, ge=0, description="Shortest schedule.checkpoint_every_minutes a job may ask for (each checkpoint stops the job to write to disk).")
    member_max_priority: int = Field(0, ge=-100, le=100, description="Highest job priority a user without an admin's grant may ask for; jobs at or below it preempt only their own team's.")
    fair_share: bool = Field(True, description="Among queued jobs of equal priority, serve first the team, and within it the user, with the fewest recent GPU-hours (FIFO within a user). Off: oldest first.")
    fair_share_half_life_h: float = Field(24.0, gt=0, description="Hours after which a GPU-hour counts half in fair share's sum of recent use.")
    fair_share_job_gpu_hours: float = Field(1.0, ge=0, description="GPU-hours per GPU that fair share counts for a running job, and for each job ordered ahead, before its use shows in the sum: GPUs that come free together go round the users.")
    reserve_after_h: float = Field(4.0, ge=0, description="Hours a queued job may be passed over (jobs behind it in the queue order start on a host it fits, whose free GPUs are too few for it) before one such host is reserved for it: no new job starts there until it runs. 0: never reserve.")
    max_files_per_user: int = Field(1000, ge=1, description="Files one user may keep; more answers 403 (DELETE /v1/files/{id} makes room).")
    max_file_bytes_per_user: int = Field(20 * 1024**3, ge=1, description="Bytes that one user's files may hold together (20 GiB); more answers 403.")
    job_create_rate: int = Field(30, ge=1, description="Jobs one user may create per sliding window (TUNEQ_JOB_CREATE_WINDOW_S); only accepted jobs count; more answers 429 with Retry-After.")
    job_create_window_s: int = Field(60, ge=1, le=86_400, description="Seconds of the job-creation rate window, counted in Redis across all API processes.")
    max_examples_per_file: int = Field(1_000_000, ge=1, description="Examples (valid lines) one uploaded file may hold; more answers 413.")
    max_tokens_per_file: int = Field(
        200_000_000, ge=1, description="Tokens a training or validation file may hold, counted with the job's tokenizer at job creation; more answers 413."
    )
    # Planner: what a job is planned against before any GPU is touched. The API host
    # usually has no GPU, so the worker hosts' memory and speed are declared here.
    plan_gpu_memory_gib: float = Field(80.0, gt=0, description="GiB of memory per worker GPU that a job's plan must fit while no worker has registered its GPUs' memory; once some have, a job is planned against the largest registered GPU of a host with enough GPUs.")
    plan_gpu_tflops: float = Field(790.0, gt=0, description="Dense bf16 peak per worker GPU in TFLOP/s, for the planner's time estimates of a GPU model that trainer/planning/speeds.json does not know (the default was measured on an H200).")
    plan_gpu_model: str = Field("NVIDIA H100 80GB HBM3", description="The worker GPUs' model name (as torch reports it), whose measured speeds and start-up (trainer/planning/speeds.json) time a plan; one the file does not know is timed by plan_gpu_tflops at a default efficiency, without start-up.")
    plan_gpu_liger: bool = Field(False, description="The worker hosts have liger-kernel installed, so the trainer runs its fused RMSNorm, RoPE and SwiGLU there; plans count the memory they save (off: planned without, which errs high).")
    # Chat completions (core/inference.py): served by `python -m worker.serve` on the hosts that run it.
    chat_max_tokens: int = Field(2048, ge=1, le=1_000_000, description="Most tokens one chat completion may generate (`max_tokens`); also its default, cut to what the model's context leaves.")
    chat_queue_timeout_s: float = Field(60.0, gt=0, le=3600, description="Seconds a chat completion waits for an inference server to start it before it answers 503.")
    chat_idle_timeout_s: float = Field(120.0, gt=0, le=3600, description="Seconds a started chat completion may go without a new token before it fails (a lost inference server).")
    serve_max_adapters: int = Field(8, ge=1, le=1000, description="Adapters an inference server keeps attached to each loaded base model; the least recently used goes first.")
    serve_max_models: int = Field(2, ge=1, le=100, description="Models of their own (full fine-tunes, adapters that cannot share a base) an inference server keeps loaded.")
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
