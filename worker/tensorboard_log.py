"""A job's curves as TensorBoard event files, written while the worker stores the trainer's events.

They live in the job's work directory (`DIR/tensorboard/`), so a resumed run appends a new file
next to the earlier ones, and are published as the artifact `tensorboard.tar.gz` when the job
ends: `tar -xzf tensorboard.tar.gz && tensorboard --logdir tensorboard`. tensorboardX writes
them: the same file format as TensorBoard's own writer without TensorFlow or TensorBoard's server.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

from core.storage import Storage
from trainer.curves import curve_points
from worker.artifacts import LOGS_KIND, Stored, publish_logs

ARTIFACT = "tensorboard.tar.gz"
KIND = LOGS_KIND


def import_writer() -> None:
    """Import tensorboardX in a thread of its own. Its import loads torch (seconds on a GPU host)
    and the worker's first curve would wait for it while storing the trainer's first events: the
    first step reached the API seconds late. Started with the job, it is done by then."""
    threading.Thread(target=_import, name="tuneq-tensorboard-import", daemon=True).start()


def _import() -> None:
    import tensorboardX  # noqa: F401 - the import is the point


class TensorBoardLog:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer: Any = None

    def add(self, ev: dict[str, Any]) -> None:
        """Write the scalars of one trainer event; events without a step or figures are skipped."""
        found = curve_points(ev.get("type", ""), ev.get("data"))
        if found is None:
            return
        step, points = found
        t = ev.get("time") if isinstance(ev.get("time"), int | float) else None
        for tag, value in points.items():
            self.writer().add_scalar(tag, value, step, walltime=t)

    def writer(self) -> Any:
        if self._writer is None:
            from tensorboardX import SummaryWriter  # protobuf: imported by the workers that write curves only

            self.log_dir.mkdir(parents=True, exist_ok=True)
            # The file name has the second and the host only; a run resumed within that second
            # would overwrite the earlier run's file without a suffix of its own.
            self._writer = SummaryWriter(str(self.log_dir), flush_secs=30, filename_suffix=f".{secrets.token_hex(4)}")
        return self._writer

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def publish(self, storage: Storage, job_id: str, attempt: int) -> Stored | None:
        """Archive every run's event files into storage; None when nothing was logged."""
        self.close()
        return publish_logs(storage, self.log_dir, job_id, attempt, ARTIFACT)
