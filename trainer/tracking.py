"""A job's curves in the experiment trackers its spec's `integrations` name (rank 0 only).

wandb: an offline Weights & Biases run in DIR/wandb/ (`wandb/offline-run-<time>-<id>/`), which the
worker publishes as the artifact `wandb.tar.gz` when the job ends; `wandb sync` uploads it to
whichever W&B server and account the user has. Offline, the trainer needs no network, no key
and no W&B account, and a job is never held up or failed by W&B: a run that cannot start or
write is reported as an `integration` warning event and training goes on without it.

The curves are the ones the worker draws for TensorBoard (trainer.curves), under the same names
(train/loss, valid/loss, eval/<grader>, ...), at the trainer's step. The run's id and default name
are the job id (as OpenAI's integration names its runs), so the offline runs that a resumed job
writes (one per attempt) sync into one W&B run.

The W&B run lives in a thread of its own: its start (the wandb-core service process, about a
second) overlaps loading the model, and the training loop only puts events on a queue.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any

from trainer.curves import curve_points
from trainer.events import EventWriter
from trainer.integration_settings import WandbSettings
from trainer.spec import JobSpec

# Set by the worker for the trainer of a job: the run's id and default name. Without it (a trainer
# run by hand) W&B picks an id and a name.
JOB_ID_ENV = "TUNEQ_JOB_ID"
WANDB_DIR = "wandb"
EVENT = "integration"
# How long the end of training waits for the W&B run to write what it was given and close.
FINISH_TIMEOUT_S = 60.0
_STOP = object()


class WandbRun:
    """One offline W&B run fed from the trainer's events; every failure becomes one warning event."""

    def __init__(self, settings: WandbSettings, spec: JobSpec, out: Path, events: EventWriter):
        self.settings, self.spec, self.out, self.events = settings, spec, out, events
        self.job_id = os.environ.get(JOB_ID_ENV) or None
        self.queue: queue.Queue[Any] = queue.Queue()
        self.failed = False
        self.exit_code = 0
        self.thread = threading.Thread(target=self._serve, name="wandb-run", daemon=True)

    def start(self) -> WandbRun:
        self.thread.start()
        return self

    def on_event(self, type: str, data: dict[str, Any]) -> None:
        """EventWriter's listener: queue the event's curve points, if it has any."""
        if not self.failed and (found := curve_points(type, data)) is not None:
            self.queue.put(found)

    def close(self, exit_code: int) -> None:
        """Write what is queued and finish the run (W&B marks a nonzero exit code failed)."""
        self.exit_code = exit_code
        self.queue.put(_STOP)
        self.thread.join(FINISH_TIMEOUT_S)
        if self.thread.is_alive():
            self._warn(f"the W&B run did not finish within {FINISH_TIMEOUT_S:g} s; its last points may be missing")

    # -- the run's thread --------------------------------------------------------------------

    def _serve(self) -> None:
        run = self._init()
        while (item := self.queue.get()) is not _STOP:
            if run is None:
                continue
            step, points = item
            try:
                run.log(points, step=step)
            except Exception as exc:  # noqa: BLE001 - W&B's failure must not fail the job
                self._warn(f"the W&B run stopped logging: {_reason(exc)}")
                run = None
        if run is not None:
            try:
                run.finish(exit_code=self.exit_code)
            except Exception as exc:  # noqa: BLE001
                self._warn(f"the W&B run did not close cleanly: {_reason(exc)}")

    def _init(self) -> Any:
        s = self.settings
        try:
            # No crash reports to W&B's error service from a self-hosted trainer.
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
            import wandb

            tags = ["tuneq/finetune", *([f"tuneq/{self.job_id}"] if self.job_id else []), *s.tags]
            config = self.spec.model_dump(mode="json", exclude={"integrations"})
            run = wandb.init(
                mode="offline", dir=str(self.out), project=s.project, entity=s.entity, name=s.name or self.job_id,
                id=self.job_id, tags=list(dict.fromkeys(tags)), config={**config, "job_id": self.job_id},
                # The trainer's output goes to trainer.log already; the work directory is no git
                # checkout and the trainer's code is tuneq's own.
                settings=wandb.Settings(console="off", silent=True, disable_git=True, save_code=False),
            )
        except Exception as exc:  # noqa: BLE001 - W&B's failure must not fail the job
            self._warn(f"the W&B run could not start: {_reason(exc)}")
            return None
        self.events.emit(EVENT, f"W&B offline run {run.id} in {WANDB_DIR}/ (published as wandb.tar.gz; upload with "
                         "`wandb sync`)", integration="wandb", run_id=run.id, project=s.project,
                         path=os.path.relpath(Path(run.dir).parent, self.out))
        return run

    def _warn(self, message: str) -> None:
        self.failed = True
        self.events.emit(EVENT, f"{message}; training goes on without it", level="warning", integration="wandb",
                         code="integration_unavailable")


def _reason(exc: BaseException) -> str:
    first = next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def start_tracking(spec: JobSpec, out: Path, events: EventWriter) -> list[WandbRun]:
    """Start a run for each integration of the spec and feed it the events from now on. Rank 0
    only: the other ranks' writers are disabled, and so is their tracking."""
    if not events.enabled:
        return []
    runs = [WandbRun(i.wandb, spec, out, events).start() for i in spec.integrations if i.type == "wandb"]
    events.listeners.extend(run.on_event for run in runs)
    return runs


def stop_tracking(runs: list[WandbRun], exit_code: int) -> None:
    for run in runs:
        run.close(exit_code)
