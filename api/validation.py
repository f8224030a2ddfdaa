"""A job's data check off the request: `validating_files` until the files are tokenized, then
`queued`, or `failed` with the same line-numbered report a quick check answers with.

Tokenizing a training file with the model's tokenizer costs about a second of CPU per megabyte,
far too long to hold a request. Files small enough to check within the request's budget
(TUNEQ_DATA_CHECK_INLINE_BYTES in all, or already counted) are checked in it, as before; larger
ones are stored as a job in `validating_files` and checked in a child process of the API, so the
tokenizer's CPU never holds the interpreter lock the API's requests need.

Nothing accepted is lost: a job is committed before the answer, under a lease (lease_owner,
lease_heartbeat_at) that the checking API process renews; every API process looks for
validating jobs whose lease went stale (the process died) and checks them itself.

Token reports are kept in the artifact store by file content (sha256), tokenizer (a hash of its
files) and format, so no file is tokenized twice for one tokenizer, by any API process.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from api.crud import file_gone
from api.errors import APIError
from core import states
from core.db import session_scope
from core.models import File, Job, JobEvent, now
from core.settings import Settings, get_settings
from core.storage import get_storage
from trainer.vocabulary import extra_files

log = logging.getLogger("tuneq.api")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
RECOVER_EVERY_S = 5.0
# A background data check that raises (not a refusal: a fault of the check itself) is retried
# this many times in all, since a database or child hiccup passes; then the job fails and says
# so, rather than sit in validating_files holding its user's quota.
CHECK_ATTEMPTS = 3
CHECK_FAILED = "The data check failed on the server"


def owner_id() -> str:
    return f"api:{os.uname().nodename}:{os.getpid()}"


# ------------------------------------------------------------------ token reports, cached


@lru_cache(maxsize=64)
def _tokenizer_hash(model_dir: str, stamp: tuple[tuple[str, float, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode() + b"\0" + (Path(model_dir) / name).read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def tokenizer_id(model_dir: str) -> str:
    """A hash of the tokenizer's own files: a retrained or swapped tokenizer gets a new id."""
    stamp = []
    for name in TOKENIZER_FILES:
        p = Path(model_dir) / name
        if p.is_file():
            st = p.stat()
            stamp.append((name, st.st_mtime, st.st_size))
    return _tokenizer_hash(model_dir, tuple(stamp))


def report_key(sha256: str, model_dir: str, max_seq_len: int, data_format: str, train_on_inputs: bool | None) -> str:
    return f"token-reports/{sha256}/{tokenizer_id(model_dir)}-{data_format}-{max_seq_len}-{train_on_inputs}.json"


def cached_report(key: str) -> dict[str, Any] | None:
    storage = get_storage()
    if not storage.exists(key):
        return None
    with storage.open(key) as f:
        return json.load(f)


def _store_report(key: str, report: dict[str, Any]) -> None:
    get_storage().put_stream(key, BytesIO(json.dumps(report).encode()))


def _take_env(env: dict[str, str]) -> None:
    """Exactly the API's TUNEQ_* settings: none that it no longer has."""
    mine = {k: v for k, v in os.environ.items() if k.startswith("TUNEQ_")}
    if mine != env:
        for k in mine.keys() - env.keys():
            del os.environ[k]
        os.environ.update(env)
        get_settings.cache_clear()


def _child_report(env: dict[str, str], *args: Any) -> dict[str, Any]:
    """In the checking child: the API's TUNEQ_* settings, then the report (tokenizers stay loaded)."""
    _take_env(env)
    from api.data_check import token_report

    return token_report(*args)


def _child_warm(env: dict[str, str], model_dirs: list[str]) -> float:
    """In the checking child: the imports of a data check and the models' tokenizers, before any
    job asks for one; the seconds it took."""
    began = time.monotonic()
    _take_env(env)
    import trainer.data.validate  # noqa: F401 - what token_report runs
    from api.data_check import model_tokenizer

    for model_dir in model_dirs:
        try:
            model_tokenizer(model_dir)
        except Exception:  # noqa: BLE001 - a model that cannot load is its data check's to report
            pass
    return time.monotonic() - began


_pool_lock = threading.Lock()
_pool: concurrent.futures.ProcessPoolExecutor | None = None
# The models whose tokenizers a new checking child loads first (warm_child); None: it starts cold.
_warm_dirs: list[str] | None = None
_warming: concurrent.futures.Future[float] | None = None


_counting: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}


PARENT_POLL_S = 1.0


def _watch_parent(parent: int) -> None:
    """In the checking child: end when the API process that made it is gone.

    An API killed outright (SIGKILL, the OOM killer) runs no shutdown, and the child would wait on
    its pipe for good, holding its tokenizers' memory. A parent-death signal would not do: it
    fires when the creating thread ends, and the pool is made on one of anyio's worker threads."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="tuneq-parent-watch", daemon=True).start()


def _process_pool_locked() -> concurrent.futures.ProcessPoolExecutor:
    global _pool, _warming
    if _pool is None:
        # spawn: a fork of a process running threads (uvicorn, SQLAlchemy pools) is unsafe.
        _pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                       initializer=_watch_parent, initargs=(os.getpid(),))
        if _warm_dirs is not None:
            # A child that replaces a dead one warms up too: its first task, ahead of any check.
            _warming = _pool.submit(_child_warm, _tuneq_env(), _warm_dirs)
    return _pool


def _tuneq_env() -> dict[str, str]:
    """The API's settings, which the checking child takes before it works (it may predate them)."""
    return {k: v for k, v in os.environ.items() if k.startswith("TUNEQ_")}


def warm_child(model_dirs: list[str]) -> None:
    """Start the checking child now, importing what a data check needs and loading these models'
    tokenizers, so that the first large job's check does not wait for a cold process."""
    global _warm_dirs, _warming
    with _pool_lock:
        _warm_dirs = list(model_dirs)
        pool = _process_pool_locked()
        if _warming is None:  # a child already running (started cold by a check): warm it too
            _warming = pool.submit(_child_warm, _tuneq_env(), _warm_dirs)


def child_state() -> str:
    """The checking child's warm-up: "ready", "warming", "failed" (the child died: the next check
    starts another), or "off" (TUNEQ_API_WARM_CHILD=false: it starts with the first large job)."""
    with _pool_lock:
        warming = _warming if _warm_dirs is not None else None
    if warming is None:
        return "off"
    if not warming.done():
        return "warming"
    return "ready" if warming.exception() is None else "failed"


def forget_warm_up() -> None:
    """Drop the app's warm-up of the checking child (its models, its state for /readyz)."""
    global _warm_dirs, _warming
    with _pool_lock:
        _warm_dirs = _warming = None


def stop_child() -> None:
    """End the checking child with its process: a tokenization it runs has no one to report to."""
    global _pool
    forget_warm_up()
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()


def run_in_child(fn: Any, *args: Any) -> Any:
    """fn(*args) in the API's checking child process; fn must be importable (a module function)."""
    with _pool_lock:
        fut = _process_pool_locked().submit(fn, *args)
    try:
        return fut.result()
    except concurrent.futures.process.BrokenProcessPool:
        global _pool
        with _pool_lock:
            _pool = None
        raise


def token_report(f: File, model_dir: str, max_seq_len: int, data_format: str, train_on_inputs: bool | None,
                 *, in_child: bool, param: str) -> dict[str, Any]:
    """trainer.data.validate_file's report of a stored file with the model's tokenizer, from the
    cache when this file was counted before with this tokenizer and format.

    A file whose bytes are gone was deleted after the request read its row: 400 naming `param`,
    as for a file that never existed (the creation's check under the file's lock says the same).
    """
    key = report_key(f.sha256, model_dir, max_seq_len, data_format, train_on_inputs)
    report = cached_report(key)
    if report is not None:
        return report
    try:
        path = get_storage().local_path(f.storage_key)
    except FileNotFoundError:
        raise file_gone(f.id, param) from None
    args = (str(path), f.sha256, model_dir, max_seq_len, data_format, train_on_inputs)
    if not in_child:
        from api.data_check import token_report as in_process

        report = in_process(*args)
        _store_report(key, report)
        return report
    # Jobs of one file created back to back share one tokenization, not one each.
    with _pool_lock:
        running = _counting.get(key)
        mine = running is None
        if mine:
            running = _counting[key] = _process_pool_locked().submit(_child_report, _tuneq_env(), *args)
    if mine:
        # Outside the lock: a future already done runs its callback here, and it takes the lock.
        running.add_done_callback(lambda fut: _stored(key, fut))
    return running.result()


def _stored(key: str, fut: concurrent.futures.Future[dict[str, Any]]) -> None:
    global _pool
    try:
        if isinstance(fut.exception(), concurrent.futures.process.BrokenProcessPool):
            with _pool_lock:
                _pool = None  # the child died (out of memory, killed): the next check starts another
        elif fut.exception() is None:
            _store_report(key, fut.result())
    except Exception:  # noqa: BLE001 - not cached: the next check counts again
        log.warning("storing the token report %s failed", key, exc_info=True)
    finally:
        with _pool_lock:
            _counting.pop(key, None)


def counted(files: list[File], spec: dict[str, Any]) -> bool:
    """True when every file of the job already has its token report for this job's shape."""
    hp = spec.get("hyperparameters") or {}
    for f in files:
        key = report_key(f.sha256, spec["model"], hp.get("max_seq_len", 0), spec.get("data_format", "auto"),
                         spec.get("train_on_inputs"))
        if not get_storage().exists(key):
            return False
    return True


def check_inline(files: list[File], spec: dict[str, Any], settings: Settings) -> bool:
    """Whether the request itself may check these files: small in all, or counted already."""
    if not Path(spec["model"]).is_dir():
        return True  # a hub model the API does not load: nothing to tokenize
    return sum(f.bytes or 0 for f in files) <= settings.data_check_inline_bytes or counted(files, spec)


# ------------------------------------------------------------------ jobs waiting for their check


def hold(job: Job) -> None:
    """Put a new validating job under this process's lease (the caller commits)."""
    job.lease_owner, job.lease_heartbeat_at = owner_id(), now()


def locked(db: Any, job_id: str, owner: str) -> Job | None:
    """The job, still validating under `owner`'s lease, with its row locked until the caller
    commits; None when it was cancelled or taken over meanwhile."""
    res = db.execute(
        update(Job).where(Job.id == job_id, Job.status == states.VALIDATING, Job.lease_owner == owner)
        .values(lease_heartbeat_at=now()).execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:
        db.rollback()
        return None
    return db.get(Job, job_id, populate_existing=True)


def files_of(db: Any, spec: Any) -> list[tuple[File, str, str]]:
    """(file, param, format) of every file a stored job spec reads, as admission listed them."""
    refs = [(spec.training_file, "training_file", spec.data_format)]
    if spec.validation_file:
        refs.append((spec.validation_file, "validation_file", spec.data_format))
    refs += [(file_id, param, fmt) for param, file_id, fmt in extra_files(spec.model_dump(mode="json"))]
    files = []
    for file_id, param, fmt in refs:
        f = db.get(File, file_id)
        if f is None:
            raise APIError(400, f"{param}: file {file_id} was deleted before the job's data check", param=param,
                           code="file_not_found")
        files.append((f, param, fmt))
    return files


def claim(db: Any, job_id: str, ttl_s: float) -> bool:
    """Take the validating job's lease if nobody holds a live one."""
    t = now()
    res = db.execute(
        update(Job).where(Job.id == job_id, Job.status == states.VALIDATING)
        .where(Job.lease_owner.is_(None) | Job.lease_heartbeat_at.is_(None) | (Job.lease_heartbeat_at < t - ttl_s)
               | (Job.lease_owner == owner_id()))
        .values(lease_owner=owner_id(), lease_heartbeat_at=t).execution_options(synchronize_session=False)
    )
    db.commit()
    return res.rowcount == 1


def check_failed(job_id: str, owner: str) -> None:
    """Record a failed attempt of the job's background check (an event its user sees), and fail
    the job once CHECK_ATTEMPTS have failed; before that, its lease lapses and a later pass retries."""
    with session_scope() as db:
        job = locked(db, job_id, owner)
        if job is None:
            return
        failed = db.scalar(select(func.count()).select_from(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.message.startswith(CHECK_FAILED))) + 1
        if failed < CHECK_ATTEMPTS:
            states.add_event(db, job, f"{CHECK_FAILED} (attempt {failed} of {CHECK_ATTEMPTS}); it will be retried.",
                             level="warning")
            return
        states.add_event(db, job, f"{CHECK_FAILED} (attempt {failed} of {CHECK_ATTEMPTS}).", level="warning")
        message = (f"the data check of this job's files failed {failed} times on the server, by a fault of the check "
                   "rather than of a line it could name (the API server's log has it); nothing was trained")
        states.transition(db, job, states.FAILED, message,
                          error={"code": "data_check_failed", "message": message, "param": None})


class Checker:
    """The API process's background checks: one thread per job being checked, a lease renewer and
    a finder of orphaned validating jobs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.checking: set[str] = set()
        self.thread: threading.Thread | None = None
        self.stopped = threading.Event()

    def start(self, job_id: str) -> None:
        """Check a committed validating job (whose lease this process holds) in the background."""
        with self.lock:
            if job_id in self.checking:
                return
            self.checking.add(job_id)
            self._ensure_thread()
        threading.Thread(target=self._check, args=(job_id,), name=f"tuneq-check-{job_id}", daemon=True).start()

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stopped.clear()
            self.thread = threading.Thread(target=self._tend, name="tuneq-checks", daemon=True)
            self.thread.start()

    def run_in_background(self) -> None:
        with self.lock:
            self._ensure_thread()

    def stop(self) -> None:
        self.stopped.set()

    def _check(self, job_id: str) -> None:
        from api.admission import finish_validation  # the creation rules, shared with the request

        try:
            finish_validation(job_id, owner_id())
        except Exception:  # noqa: BLE001 - the lease lapses and the next pass (or process) retries
            log.exception("data check of job %s failed", job_id)
            try:
                check_failed(job_id, owner_id())
            except Exception:  # noqa: BLE001 - the database is out too: the lease lapses all the same
                log.warning("could not record the failed data check of job %s", job_id, exc_info=True)
        finally:
            with self.lock:
                self.checking.discard(job_id)

    def _tend(self) -> None:
        while not self.stopped.wait(min(get_settings().heartbeat_s, RECOVER_EVERY_S)):
            try:
                self._renew()
                self._adopt_orphans()
            except Exception:  # noqa: BLE001 - a database outage: the next pass retries
                log.warning("tending validating jobs failed; retrying", exc_info=True)

    def _renew(self) -> None:
        with self.lock:
            ids = list(self.checking)
        if ids:
            with session_scope() as db:
                db.execute(update(Job).where(Job.id.in_(ids), Job.lease_owner == owner_id(), Job.status == states.VALIDATING)
                           .values(lease_heartbeat_at=now()).execution_options(synchronize_session=False))

    def _adopt_orphans(self) -> None:
        ttl = get_settings().lease_ttl_s
        with session_scope() as db:
            ids = db.scalars(select(Job.id).where(
                Job.status == states.VALIDATING,
                Job.lease_owner.is_(None) | Job.lease_heartbeat_at.is_(None) | (Job.lease_heartbeat_at < now() - ttl),
            ).order_by(Job.created_at).limit(8)).all()
            for job_id in ids:
                if claim(db, job_id, ttl):
                    log.info("job %s was left validating (its API process stopped); checking it here", job_id)
                    self.start(job_id)


CHECKER = Checker()

