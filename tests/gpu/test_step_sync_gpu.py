"""On a GPU the steady-state training step makes the host wait for the device nowhere in tuneq.

torch.cuda.set_sync_debug_mode("warn") warns at every operation that makes the host wait for the
stream (a value read, a blocking copy); Python attributes the warning to the line that called
the operation. From the third step until the last one is drained, the only waits allowed are
transformers' own: its attention-mask code asks once per forward whether the mask has padding
(masking_utils), which tuneq cannot avoid without changing the attention kernel. The late read of
a step's values waits on a CUDA event for a copy queued a step earlier, which is no stream sync.

Marked `gpu`: run on the lent H200 with `python3 -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import traceback
import warnings
from pathlib import Path

import pytest
import torch

from tests.datasets import reverse_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS, FIRST_WATCHED, MICRO = 8, 3, 2


def test_steady_state_steps_do_not_sync(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import trainer.loop
    from trainer import step_values
    from trainer.job import run_job
    from trainer.spec import JobSpec

    data = tmp_path / "train.jsonl"
    data.write_text(reverse_dataset(64, seed=1))
    spec = JobSpec.model_validate({
        "model": str(tiny_model_dir), "method": "lora", "training_file": str(data), "lora": {"r": 16, "alpha": 64},
        "hyperparameters": {"max_steps": STEPS, "batch_size": 4, "gradient_accumulation_steps": MICRO,
                            "learning_rate": 3e-3, "warmup_steps": 0},
        "schedule": {"log_every_steps": 1},
    })
    queued = {"n": 0}
    queue = trainer.loop.queue_forward_backward

    def queue_step(*args, **kwargs):
        queued["n"] += 1
        if queued["n"] == FIRST_WATCHED:
            # Switching the mode on warns by itself (torch/cuda/__init__.py, in set_sync_debug_mode):
            # that was the "sync" this test reported twice on the H200, by the stack kept below.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.cuda.set_sync_debug_mode("warn")
        return queue(*args, **kwargs)

    class WatchedLateRead(step_values.LateRead):
        def __init__(self, values: torch.Tensor) -> None:
            super().__init__(values)
            self.step = queued["n"]

        def read(self) -> list[float]:
            if self.step == STEPS:  # the last step is drained; the end of training may sync freely
                torch.cuda.set_sync_debug_mode("default")
            return super().read()

    # Keep the Python stack of every sync warning, so a failure names its caller.
    stacks: list[str] = []

    def keep_stack(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ARG001
        if "synchronizing" in str(message):
            stacks.append(f"{filename}:{lineno}\n" + "".join(traceback.format_stack(limit=14)[:-1]))

    monkeypatch.setattr(trainer.loop, "queue_forward_backward", queue_step)
    monkeypatch.setattr(trainer.loop, "LateRead", WatchedLateRead)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = keep_stack
            assert run_job(spec, tmp_path / "run") == 0
    finally:
        torch.cuda.set_sync_debug_mode("default")

    ours = [st for st in stacks if "transformers" not in st.splitlines()[0]]
    assert ours == [], "\n\n".join(ours)
