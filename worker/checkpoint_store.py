"""Checkpoints in the shared store, so that any host can carry on any job.

Each checkpoint the trainer writes is uploaded by a thread of the worker while training goes on
(the trainer is another process and never waits for it), under
jobs/{job}/checkpoints/{step-N}/, every file checked against the trainer's manifest.json, the
manifest uploaded last. Its row is marked uploaded only then: from that moment any host may
resume or continue from it. Rotation (keep_checkpoints) removes the row first, then the files,
so a listed checkpoint is always whole in the store. With export.select best, the checkpoint
with the best eval score is kept besides the newest ones, and a resumed run gets it too: its
weights may become final/.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.db import get_sessionmaker
from core.models import Checkpoint, JobEvent
from core.storage import NOT_LINKABLE, Storage, sha256_file, write_hashed
from trainer.graders import best_step

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the trainer writes it last into each checkpoint: sizes and sha256 of the rest
CHECKPOINTS = "checkpoints"  # the trainer's folder of checkpoints in the work directory
UPLOADS = "uploads"  # hard-linked snapshots waiting for their upload


class CheckpointCorrupt(OSError):
    """A file does not match its manifest (or is gone): this copy cannot be trusted."""


def store_prefix(job_id: str, name: str) -> str:
    return f"jobs/{job_id}/checkpoints/{name}"


def name_of(ck: Checkpoint) -> str:
    """The checkpoint's folder name (step-N), the same in the store and in a work directory."""
    return (ck.storage_key or ck.path).rstrip("/").rsplit("/", 1)[-1]


def snapshot(src: Path, uploads: Path) -> Path | None:
    """Hard-link a checkpoint's files into uploads/: the trainer deletes its own folder when it
    rotates, maybe before the upload ends, and links keep the bytes without copying them.
    None when the checkpoint is already gone (or incomplete)."""
    dest = uploads / src.name
    tmp = dest.with_name(dest.name + ".tmp")
    for stale in (dest, tmp):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for p in src.iterdir():
            try:
                os.link(p, tmp / p.name)
            except OSError as exc:
                if exc.errno not in NOT_LINKABLE:
                    raise
                shutil.copy2(p, tmp / p.name)
    except FileNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    if not (tmp / MANIFEST).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    tmp.rename(dest)
    return dest


def _files(raw: bytes) -> dict[str, dict[str, Any]]:
    return json.loads(raw)["files"]


def upload(storage: Storage, src: Path, prefix: str) -> int:
    """Store every file of the checkpoint folder src under prefix, the manifest last; bytes stored."""
    raw = (src / MANIFEST).read_bytes()
    total = 0
    for name, want in sorted(_files(raw).items()):
        path = src / name
        try:
            ok = path.stat().st_size == want["bytes"] and sha256_file(path) == want["sha256"]
        except FileNotFoundError:
            ok = False
        if not ok:
            raise CheckpointCorrupt(f"{path} does not match its manifest")
        storage.adopt(f"{prefix}/{name}", path, keep=True)
        total += want["bytes"]
    storage.put_stream(f"{prefix}/{MANIFEST}", io.BytesIO(raw))
    return total


def stored_manifest(storage: Storage, prefix: str) -> bytes:
    return b"".join(storage.iter_bytes(f"{prefix}/{MANIFEST}"))


def verify_local(directory: Path, raw: bytes) -> bool:
    """True when directory holds exactly the checkpoint whose manifest is raw (every sha256 checked)."""
    try:
        if (directory / MANIFEST).read_bytes() != raw:
            return False
        return all(sha256_file(directory / n) == w["sha256"] for n, w in _files(raw).items())
    except OSError:
        return False


def fetch(storage: Storage, prefix: str, raw: bytes, dest: Path) -> None:
    """Download a stored checkpoint into dest (a new folder), every file checked on the way."""
    tmp = dest.with_name(dest.name + ".fetch")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, want in _files(raw).items():
        with contextlib.closing(storage.open(f"{prefix}/{name}")) as stream:
            size, sha = write_hashed(stream, tmp / name)
        if (size, sha) != (want["bytes"], want["sha256"]):
            raise CheckpointCorrupt(f"{prefix}/{name}: {size} bytes, sha256 {sha}; the manifest says {want}")
    (tmp / MANIFEST).write_bytes(raw)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def keep_checkpoints(spec: dict[str, Any]) -> int:
    from trainer.spec import Schedule

    try:
        return Schedule.model_validate(spec.get("schedule") or {}).keep_checkpoints
    except ValueError:
        return Schedule().keep_checkpoints


def selection_metric(spec: dict[str, Any]) -> str | None:
    """eval_<name> when the job exports its best-scoring checkpoint (export.select best), else None."""
    from trainer.eval_settings import selection_metric as of_spec
    from trainer.spec import JobSpec

    try:
        return of_spec(JobSpec.model_validate(spec))
    except ValueError:
        return None


def best_of(rows: list[Checkpoint], metric: str | None) -> Checkpoint | None:
    """The checkpoint with the best `metric` among rows, by the trainer's rule (trainer.graders.best_step)."""
    chosen = best_step([(c.step, c.metrics or {}) for c in rows], metric) if metric else None
    return next((c for c in rows if chosen is not None and c.step == chosen[0]), None)


def weights_dir(storage: Storage, prefix: str) -> Path:
    """A local folder with a stored checkpoint's weights (not its optimizer state), fetched
    through the store's local copies: they land side by side, as in the checkpoint."""
    from worker.artifacts import CHECKPOINT_RESUME_ONLY

    paths = [storage.local_path(f"{prefix}/{name}") for name in _files(stored_manifest(storage, prefix))
             if name not in CHECKPOINT_RESUME_ONLY]
    return paths[0].parent


def newest_uploaded(db: Session, job_id: str) -> Checkpoint | None:
    return db.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.uploaded_at.is_not(None))
                     .order_by(Checkpoint.step.desc()).limit(1))


def uploaded(db: Session, job_id: str) -> list[Checkpoint]:
    """The job's resumable checkpoints, newest first."""
    return list(db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.uploaded_at.is_not(None))
                           .order_by(Checkpoint.step.desc())))


def unstored_snapshots(db: Session, job_id: str, work_dir: Path, host: str | None) -> list[tuple[int, Path]]:
    """(step, snapshot), oldest first, of the checkpoints an earlier attempt on this host announced
    (their rows committed, their events read) but did not store: a worker killed during an upload
    leaves the row without uploaded_at and the snapshot in uploads/. The snapshot where it is whole,
    else a new one of the trainer's folder where it still holds the checkpoint; one whose files are
    gone is left out, and prepare_resume drops its row."""
    rows = db.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.uploaded_at.is_(None))
                      .order_by(Checkpoint.step).execution_options(populate_existing=True)).all()
    found = []
    for row in rows:
        src = Path(row.path)
        if (row.host is not None and host is not None and row.host != host) or not src.is_relative_to(work_dir):
            continue  # another host's: its files are on that host's disk
        snap = work_dir / UPLOADS / src.name
        if not (snap / MANIFEST).is_file():
            snap = snapshot(src, work_dir / UPLOADS)
        if snap is not None:
            found.append((row.step, snap))
    return found


def prepare_resume(db: Session, storage: Storage, job_id: str, work_dir: Path,
                   metric: str | None = None, only: Checkpoint | None = None) -> Checkpoint | None:
    """Leave in work_dir/checkpoints exactly the newest uploaded checkpoint (the local copy when
    it matches the stored manifest, else a download) and return it; None: start from step 0.
    With `metric` (export.select best) the best checkpoint by it is left there too.

    Checkpoints that never reached the store are dropped, rows and files: they are not
    resumable, and the trainer must not pick one of them as its newest. `only`: that checkpoint
    and no other, the rows left alone (another host of a job across hosts, told by the leader).
    """
    if only is None:
        db.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.uploaded_at.is_(None)))
        rows = uploaded(db, job_id)
        newest, best = (rows[0] if rows else None), best_of(rows, metric)
    else:
        newest = best = only
    db.commit()
    shutil.rmtree(work_dir / UPLOADS, ignore_errors=True)
    root = work_dir / CHECKPOINTS
    wanted = {name_of(c): (c, stored_manifest(storage, c.storage_key)) for c in (newest, best)
              if c is not None and c.storage_key}
    local = set()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.name in wanted and verify_local(d, wanted[d.name][1]):
            local.add(d.name)
        else:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
    if newest is None or name_of(newest) not in wanted:
        return None
    for name, (ck, raw) in wanted.items():
        if name in local:
            log.info("job %s: the local copy of %s matches the store", job_id, name)
        else:
            log.info("job %s: fetching %s from the store", job_id, name)
            fetch(storage, ck.storage_key, raw, root / name)  # type: ignore[arg-type]
    return newest


def rotate(db: Session, storage: Storage, job_id: str, keep: int, metric: str | None = None) -> list[int]:
    """Delete all but the newest `keep` uploaded checkpoints (and the best by `metric`): rows
    first (a listed checkpoint is always whole), then their files. Returns the steps removed."""
    rows = uploaded(db, job_id)
    best = best_of(rows, metric)
    old = [c for c in rows[keep:] if c is not best]
    if not old:
        return []
    db.execute(delete(Checkpoint).where(Checkpoint.id.in_([c.id for c in old])))
    db.commit()
    for ck in old:
        if ck.storage_key:
            storage.delete_prefix(ck.storage_key)
    return [c.step for c in old]


class Uploader:
    """A worker thread that uploads a run's checkpoints in the order they were written.

    `may_write` is asked before each database write: a run that lost its lease must not mark
    or rotate checkpoints that another worker now owns.
    """

    def __init__(self, storage: Storage, job_id: str, keep: int, may_write: Callable[[], bool],
                 metric: str | None = None):
        self.storage, self.job_id, self.keep, self.may_write = storage, job_id, keep, may_write
        self.metric = metric  # export.select best: the checkpoint best by it is kept from rotation
        self.pending: list[tuple[int, Path]] = []
        self.busy = False
        self.cond = threading.Condition()
        self.stopped = False
        self.uploaded: list[int] = []
        self.thread = threading.Thread(target=self._run, name=f"ckpt-upload-{job_id}", daemon=True)

    def __enter__(self) -> Uploader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(60)

    def submit(self, step: int, snap: Path) -> None:
        self.submit_all([(step, snap)])

    def submit_all(self, snapshots: list[tuple[int, Path]]) -> None:
        """(step, snapshot) pairs, oldest first; given together, the upload thread sees them all
        before it picks one, so those already superseded are dropped rather than uploaded."""
        if not snapshots:
            return
        with self.cond:
            self.pending.extend(snapshots)
            self.cond.notify_all()

    def drain(self, give_up: Callable[[], bool] = lambda: False) -> bool:
        """Wait until every submitted checkpoint is uploaded (or dropped); False if give_up said so first."""
        with self.cond:
            while self.pending or self.busy:
                if give_up():
                    return False
                self.cond.wait(0.2)
        return True

    def _next(self) -> tuple[int, Path] | None:
        with self.cond:
            while not self.pending and not self.stopped:
                self.cond.wait()
            if not self.pending:
                return None
            # Behind by more than keep_checkpoints: the oldest would be rotated away at once. Not
            # with export.select best: any of them may be the best, which rotation keeps.
            while len(self.pending) > self.keep and self.metric is None:
                step, snap = self.pending.pop(0)
                self._drop(step, snap, "superseded before its upload began")
            self.busy = True
            return self.pending.pop(0)

    def _run(self) -> None:
        while (item := self._next()) is not None:
            step, snap = item
            try:
                self._upload(step, snap)
            except Exception:  # noqa: BLE001 - one failed upload must not stop the next ones
                log.warning("job %s: upload of checkpoint %s failed", self.job_id, snap.name, exc_info=True)
                self._drop(step, snap, "its upload failed")
            finally:
                shutil.rmtree(snap, ignore_errors=True)
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _upload(self, step: int, snap: Path) -> None:
        prefix = store_prefix(self.job_id, snap.name)
        started, t0 = time.time(), time.monotonic()
        size = upload(self.storage, snap, prefix)
        seconds = time.monotonic() - t0
        if not self.may_write():
            return
        with get_sessionmaker()() as db:
            db.execute(update(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step)
                       .values(storage_key=prefix, uploaded_at=time.time()))
            # In the job's events: when it became resumable anywhere, and what the upload cost.
            db.add(JobEvent(job_id=self.job_id, type="checkpoint_stored",
                            message=f"Checkpoint {snap.name} stored ({size / 1e6:.1f} MB in {seconds:.1f} s).",
                            data={"step": step, "bytes": size, "seconds": round(seconds, 3), "started_at": started}))
            db.commit()
            removed = rotate(db, self.storage, self.job_id, self.keep, self.metric)
        self.uploaded.append(step)
        log.info("job %s: checkpoint %s uploaded (%.1f MB in %.2f s)%s", self.job_id, snap.name, size / 1e6, seconds,
                 f"; removed steps {removed} from the store" if removed else "")

    def _drop(self, step: int, snap: Path, why: str) -> None:
        log.warning("job %s: checkpoint %s not stored: %s", self.job_id, snap.name, why)
        shutil.rmtree(snap, ignore_errors=True)
        if not self.may_write():
            return
        try:
            with get_sessionmaker()() as db:
                db.execute(delete(Checkpoint).where(Checkpoint.job_id == self.job_id, Checkpoint.step == step,
                                                    Checkpoint.uploaded_at.is_(None)))
                db.commit()
        except Exception:  # noqa: BLE001 - the next attempt drops rows that never reached the store
            log.warning("job %s: could not remove the row of checkpoint %s", self.job_id, snap.name, exc_info=True)
