"""Reading the trainer's events.jsonl and turning each line into DB state.

The file is appended while we read it, so the reader keeps a byte offset and leaves a line
without its newline for the next read. The offset is also written next to the file after every
commit, so a re-run of the job (after a worker crash) does not store the same events twice.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.models import Checkpoint, Job
from trainer.vocabulary import PREFERENCE_TRAIN_METRICS, PREFERENCE_VALID_METRICS, eval_scores
from worker.checkpoint_store import UPLOADS, snapshot

log = logging.getLogger(__name__)

PROGRESS_KEYS = ("step", "total_steps", "epoch", "tokens_per_second", "peak_memory_bytes", "train_loss")
TRAIN_METRIC_KEYS = ("step", "train_loss", "learning_rate", "grad_norm", "tokens", *PREFERENCE_TRAIN_METRICS)
VALID_METRIC_KEYS = ("valid_loss", "valid_mean_token_accuracy", PREFERENCE_VALID_METRICS[0])


class EventTail:
    def __init__(self, path: Path, offset_path: Path):
        self.path = path
        self.offset_path = offset_path
        self.offset = self._load_offset()

    def _load_offset(self) -> int:
        try:
            return int(self.offset_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def save_offset(self) -> None:
        tmp = self.offset_path.with_suffix(".tmp")
        tmp.write_text(str(self.offset))
        tmp.replace(self.offset_path)

    def read(self) -> list[dict[str, Any]]:
        """Complete lines appended since the last read, parsed; malformed lines are skipped."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # the file was started anew (a fresh, not resumed, run)
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for raw in chunk[:end].split(b"\n"):
            if not raw.strip():
                continue
            try:
                ev = json.loads(raw)
            except json.JSONDecodeError:
                log.warning("skipping malformed event line in %s: %.200r", self.path, raw)
                continue
            if isinstance(ev, dict) and isinstance(ev.get("type"), str):
                events.append(ev)
        return events


class ProgressTracker:
    """Folds events into job.progress / job.metrics; remembers what the end of the run needs."""

    def __init__(self, work_dir: Path, host: str | None = None):
        self.work_dir = work_dir
        self.host = host
        # (step, snapshot) of checkpoints announced since the last take_new_checkpoints(): they are
        # uploaded once their rows are committed.
        self.new_checkpoints: list[tuple[int, Path]] = []
        # Snapshots taken by hold() as soon as their events were read, by the checkpoint's path.
        self.held: dict[str, Path | None] = {}
        self.last_error: dict[str, Any] | None = None
        self.finished: dict[str, Any] | None = None
        self.started_up = False  # the trainer reported its first step (its startup event)
        self._rate_origin: tuple[float, int] | None = None  # (time, step) of this run's first metrics

    def hold(self, events: list[dict[str, Any]]) -> None:
        """Snapshot the checkpoints these events announce, before any of them is applied.

        The trainer keeps only its newest keep_checkpoints folders, and applying a batch of
        events (a database row each) can take longer than it needs to write that many more: a
        checkpoint snapshotted only when its turn came was often rotated away by then, and on a
        busy host whole runs went by with none of their checkpoints reaching the store. Hard
        links taken at once keep each one whose event was read while it was still on disk."""
        for ev in events:
            data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
            rel = data.get("path")
            if ev.get("type") == "checkpoint" and isinstance(data.get("step"), int) and rel and rel not in self.held:
                self.held[rel] = snapshot(self.work_dir / rel, self.work_dir / UPLOADS)

    def apply(self, db: Session, job: Job, ev: dict[str, Any]) -> None:
        data = ev.get("data") if isinstance(ev.get("data"), dict) else {}
        kind = ev["type"]
        states.add_event(
            db, job, str(ev.get("message") or kind), type=kind[:20], level=_level(ev.get("level")),
            data=data, created_at=_float(ev.get("time")),
        )
        if kind == "start":
            job.progress = {**job.progress, "step": data.get("resumed_from_step") or 0,
                            "total_steps": data.get("total_steps")}
        elif kind == "metrics":
            self._on_metrics(job, data, _float(ev.get("time")) or time.time())
        elif kind == "startup":
            self._on_startup(job, data, _float(ev.get("time")) or time.time())
        elif kind == "validation":
            job.metrics = {**job.metrics, **_pick(data, VALID_METRIC_KEYS)}
        elif kind == "eval":
            # The newest eval pass's scores; eval_seconds (its generation) is shown beside the step time.
            job.metrics = {**job.metrics, **eval_scores(data)}
            job.progress = {**job.progress, "eval_seconds": data.get("eval_seconds"), "eval_step": data.get("step")}
        elif kind == "checkpoint":
            self._on_checkpoint(db, job, data)
        elif kind == "error":
            self.last_error = data | {"message": data.get("message") or ev.get("message") or "training failed"}
        elif kind == "finished":
            # The trainer emits it once final/ is whole: from now on the job is never trained
            # again, whatever happens to this worker while it publishes.
            self.finished = data
            job.trained_at = job.trained_at or time.time()

    def _on_metrics(self, job: Job, data: dict[str, Any], t: float) -> None:
        progress = {**job.progress, **_pick(data, PROGRESS_KEYS)}
        step, total = data.get("step"), data.get("total_steps")
        if isinstance(step, int) and isinstance(total, int):
            if self._rate_origin is None:
                self._rate_origin = (t, step)
            t0, s0 = self._rate_origin
            if step > s0 and t > t0:
                progress["eta_seconds"] = round((total - step) * (t - t0) / (step - s0), 1)
                # This run's mean wall time per step, its eval passes and checkpoints included.
                progress["step_seconds"] = round((t - t0) / (step - s0), 3)
        job.progress = progress
        job.metrics = {**job.metrics, **_pick(data, TRAIN_METRIC_KEYS)}

    def _on_startup(self, job: Job, data: dict[str, Any], t: float) -> None:
        self.started_up = True
        """progress.startup: the seconds of each phase from submission to the first step. The
        validation, queue and launch are the service's (request -> data checked and queued ->
        running -> trainer process, or the job's arrival at a standby trainer), the rest the
        trainer's own. A resumed run's start-up replaces the first one's."""
        phases = data.get("phases") if isinstance(data.get("phases"), dict) else {}
        began = _float(data.get("process_started"))
        service: dict[str, float] = {}
        submitted = _float(job.progress.get("submitted_at")) or job.created_at
        queued = _float(job.progress.get("queued_at")) or job.created_at
        if job.started_at is not None and queued is not None and not job.progress.get("startup"):
            if submitted is not None and queued > submitted:
                service["validation"] = round(queued - submitted, 3)
            service["queue"] = round(max(job.started_at - queued, 0.0), 3)
        if began is not None and job.started_at is not None:
            service["launch"] = round(max(began - job.started_at, 0.0), 3)
        origin = submitted if "queue" in service else began
        total = round(t - origin, 3) if origin is not None else _float(data.get("seconds"))
        job.progress = {**job.progress, "startup": {**service, **phases, "total": total}}

    def _on_checkpoint(self, db: Session, job: Job, data: dict[str, Any]) -> None:
        step, rel = data.get("step"), data.get("path")
        if not isinstance(step, int) or not rel:
            return
        # A resumed run may announce a step again; one row per step.
        known = db.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step == step))
        held = rel in self.held
        snap = self.held.pop(rel, None)
        if known is not None and known.uploaded_at is not None:
            if snap is not None:
                shutil.rmtree(snap, ignore_errors=True)
            return
        if not held:
            snap = snapshot(self.work_dir / rel, self.work_dir / UPLOADS)
        if snap is None:  # already rotated away by the trainer when its event was read: a newer one follows
            log.warning("job %s: checkpoint %s was gone before it could be stored", job.id, rel)
            return
        if known is None:
            db.add(Checkpoint(job_id=job.id, step=step, path=str(self.work_dir / rel), metrics=data.get("metrics") or {},
                              host=self.host))
        self.new_checkpoints.append((step, snap))

    def take_new_checkpoints(self) -> list[tuple[int, Path]]:
        taken, self.new_checkpoints = self.new_checkpoints, []
        return taken


def _pick(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: data[k] for k in keys if k in data}


def _level(value: Any) -> str:
    return value if value in ("info", "warning", "error") else "info"


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None
