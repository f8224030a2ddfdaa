"""A job's curves as TensorBoard event files, written while the worker stores the trainer's events.

They live in the job's work directory (`DIR/tensorboard/`), so a resumed run appends a new file
next to the earlier ones, and are published as the artifact `tensorboard.tar.gz` when the job
ends: `tar -xzf tensorboard.tar.gz && tensorboard --logdir tensorboard`. tensorboardX writes
them: the same file format as TensorBoard's own writer without TensorFlow or TensorBoard's server.
"""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

from core.storage import Storage
from trainer.vocabulary import PREFERENCE_TRAIN_METRICS
from worker.artifacts import Stored, _archive

log = logging.getLogger(__name__)

ARTIFACT = "tensorboard.tar.gz"
KIND = "logs"
GiB = 2**30

# event type -> [(data key, tag, scale)]
SCALARS: dict[str, list[tuple[str, str, float]]] = {
    "metrics": [
        ("train_loss", "train/loss", 1.0), ("learning_rate", "train/learning_rate", 1.0),
        ("grad_norm", "train/grad_norm", 1.0), ("epoch", "train/epoch", 1.0), ("tokens", "train/tokens", 1.0),
        ("tokens_per_second", "train/tokens_per_second", 1.0), ("mfu", "train/mfu", 1.0),
        ("peak_memory_bytes", "train/peak_memory_gib", 1 / GiB),
        ("train_mean_token_accuracy", "train/mean_token_accuracy", 1.0),
        # A preference job's: train/preference_accuracy, train/chosen_reward, ...
        *((key, "train/" + key.removeprefix("train_"), 1.0) for key in PREFERENCE_TRAIN_METRICS),
    ],
    "validation": [
        ("valid_loss", "valid/loss", 1.0), ("valid_mean_token_accuracy", "valid/mean_token_accuracy", 1.0),
        ("valid_perplexity", "valid/perplexity", 1.0), ("full_valid_loss", "valid/full_loss", 1.0),
        ("full_valid_mean_token_accuracy", "valid/full_mean_token_accuracy", 1.0),
        ("valid_preference_accuracy", "valid/preference_accuracy", 1.0),
        ("full_valid_preference_accuracy", "valid/full_preference_accuracy", 1.0),
    ],
    "forgetting": [
        ("forgetting_loss_before", "forgetting/loss_before", 1.0), ("forgetting_loss_after", "forgetting/loss_after", 1.0),
    ],
}


class TensorBoardLog:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._writer: Any = None

    def add(self, ev: dict[str, Any]) -> None:
        """Write the scalars of one trainer event; events without a step or figures are skipped."""
        data = ev.get("data")
        scalars = SCALARS.get(ev.get("type", ""))
        if ev.get("type") == "eval" and isinstance(data, dict):
            # Graders are named by the job: eval/<name> for each score, and the pass's seconds.
            scalars = [(k, "eval/" + k.removeprefix("eval_"), 1.0) for k in data if k.startswith("eval_")]
        if not scalars or not isinstance(data, dict) or not isinstance(data.get("step"), int):
            return
        t = ev.get("time") if isinstance(ev.get("time"), int | float) else None
        for key, tag, scale in scalars:
            value = data.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.writer().add_scalar(tag, value * scale, data["step"], walltime=t)

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
        """Archive every run's event files into storage; None when nothing was logged.

        The key carries the attempt: stored keys are never rewritten, and a later run of the
        same job (after a lost lease) publishes its own.
        """
        self.close()
        if not self.log_dir.is_dir() or not any(self.log_dir.iterdir()):
            return None
        try:
            return _archive(storage, self.log_dir, f"jobs/{job_id}/tensorboard-{attempt}.tar.gz", ARTIFACT, KIND,
                            self.log_dir.name)
        except Exception:  # noqa: BLE001 - any storage error
            # Curves are a convenience: their loss must not fail a trained job.
            log.warning("job %s: could not publish the TensorBoard logs", job_id, exc_info=True)
            return None
