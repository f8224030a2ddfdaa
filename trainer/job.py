"""One training job as a process sees it: run it, turn every failure into an error event and
an exit code (docs/internals.md: 0 success, 75 paused, 143 cancelled, 1 failed)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch

from trainer.errors import OutOfMemory, Stopped, TrainerError
from trainer.events import EventWriter
from trainer.signals import PAUSE_FILE, StopFlags, handle_signals
from trainer.spec import JobSpec
from trainer.tracking import start_tracking, stop_tracking

EXIT_OK, EXIT_FAILED = 0, 1

OOM_HINT = (
    "lower hyperparameters.batch_size (raise gradient_accumulation_steps to keep the effective batch), "
    "set gradient_checkpointing: true, use method 'qlora', or lower hyperparameters.max_seq_len"
)


DISTRIBUTED_HINT = (
    "another process of this multi-GPU job stopped or the GPUs lost contact; the job is retried from its "
    "newest checkpoint (see trainer.log of every rank)"
)

# Tests only: the trainer runs out of GPU memory at once, as on a host whose GPUs are too small
# (the placement tests have no GPU to fill).
TEST_OOM_ENV = "TUNEQ_TEST_OOM"


def run_job(spec: JobSpec, out_dir: str | Path, resume: bool = False, flags: StopFlags | None = None) -> int:
    from trainer.distributed import build_accelerator, is_distributed_failure
    from trainer.loop import train
    from trainer.model import quiet_libraries

    quiet_libraries()
    out = Path(out_dir)
    cuda = torch.cuda.is_available()
    # Mixed precision is decided per device and spec inside train(); Accelerator needs it now.
    wants_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        accelerator, _ = build_accelerator(spec, cuda, wants_bf16)
    except TrainerError as err:
        with EventWriter(out / "events.jsonl", enabled=is_main) as events:
            events.emit("error", err.message, level="error", code=err.code, hint=err.hint)
        return EXIT_FAILED
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    events = EventWriter(out / "events.jsonl", enabled=accelerator.is_main_process)
    flags = flags or StopFlags(pause_file=out / PAUSE_FILE)
    # The spec's integrations (a W&B run) see the events from here on; rank 0 only.
    tracking = start_tracking(spec, out, events) if spec.integrations else []
    code = EXIT_FAILED
    try:
        with handle_signals(flags):
            try:
                if os.environ.get(TEST_OOM_ENV) == "1":
                    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated: {TEST_OOM_ENV}=1)")
                train(spec, out, accelerator, events, resume=resume, flags=flags)
            except torch.cuda.OutOfMemoryError as exc:
                raise OutOfMemory(f"the GPU ran out of memory: {str(exc).splitlines()[0]}", hint=OOM_HINT) from exc
        code = EXIT_OK
        return code
    except Stopped as stop:
        code = stop.exit_code
        return code
    except TrainerError as err:
        events.emit("error", err.message, level="error", code=err.code, hint=err.hint)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the worker must get an event, not just a dead process
        traceback.print_exc()
        if is_distributed_failure(exc):
            # Not a bug and not the user's: a peer died or the network failed. Code `distributed`
            # is an infrastructure failure to the worker, which retries the job.
            events.emit("error", f"a collective operation failed: {str(exc).splitlines()[0][:300]}", level="error",
                        code="distributed", hint=DISTRIBUTED_HINT)
            return EXIT_FAILED
        events.emit("error", f"internal error: {type(exc).__name__}: {exc}", level="error", code="internal",
                    hint="see trainer.log; this is a bug in tuneq, please report it")
        return EXIT_FAILED
    finally:
        stop_tracking(tracking, code)
        events.close()
