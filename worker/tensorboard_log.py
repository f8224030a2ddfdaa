"""A job's curves as TensorBoard event files, written while the worker stores the trainer's events.

They live in the job's work directory (`DIR/tensorboard/`), so a resumed run appends a new file
next to the earlier ones, and are published as the artifact `tensorboard.tar.gz` when the job
ends: `tar -xzf tensorboard.tar.gz && tensorboard --logdir tensorboard`. tensorboardX writes
them: the same file format as TensorBoard's own writer without TensorFlow or TensorBoard's server.
"""

from __future__ import annotations

import importlib.abc
import secrets
import sys
import threading
from pathlib import Path
from typing import Any

from core.storage import Storage
from trainer.curves import curve_points
from worker.artifacts import LOGS_KIND, Stored, publish_logs

ARTIFACT = "tensorboard.tar.gz"
KIND = LOGS_KIND


def import_writer() -> None:
    """Import tensorboardX in a thread of its own, as the job's trainer starts: the worker's first
    curve would wait for it while storing the trainer's first events, and the first step reached
    the API seconds late."""
    if "tensorboardX" not in sys.modules:  # once per worker: later jobs find it imported
        threading.Thread(target=load_tensorboardx, name="tuneq-tensorboard-import", daemon=True).start()


class _NoTorchForTensorBoardX(importlib.abc.MetaPathFinder):
    """tensorboardX's writer imports torch at its own import, if it can, only to take torch
    tensors as values; the worker writes floats. Answered ImportError, as where torch is not
    installed, it skips that: torch's import is a second of CPU here and seconds on a GPU host, and
    hundreds of MiB in the worker for nothing. Only imports made from tensorboardX's modules are
    refused; any other thread's import of torch goes on as ever."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] != "torch":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if str(frame.f_globals.get("__name__", "")).startswith("tensorboardX"):
                raise ModuleNotFoundError("not imported for tensorboardX's scalars", name=name)
            frame = frame.f_back
        return None


def load_tensorboardx() -> Any:
    """The tensorboardX package, imported without torch unless something imported torch already."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    finder = _NoTorchForTensorBoardX()
    sys.meta_path.insert(0, finder)
    try:
        import tensorboardX

        return tensorboardX
    finally:
        sys.meta_path.remove(finder)


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
            summary_writer = load_tensorboardx().SummaryWriter  # imported by the workers that write curves only

            self.log_dir.mkdir(parents=True, exist_ok=True)
            # The file name has the second and the host only; a run resumed within that second
            # would overwrite the earlier run's file without a suffix of its own.
            self._writer = summary_writer(str(self.log_dir), flush_secs=30, filename_suffix=f".{secrets.token_hex(4)}")
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
