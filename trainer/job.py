"""One training job as a process sees it: run it, turn every failure into an error event and
an exit code (docs/internals.md: 0 success, 75 paused, 143 cancelled, 1 failed)."""

from __future__ import annotations

import traceback
from pathlib import Path

import torch

from trainer.errors import OutOfMemory, Stopped, TrainerError
from trainer.events import EventWriter
from trainer.signals import StopFlags, handle_signals
from trainer.spec import JobSpec

EXIT_OK, EXIT_FAILED = 0, 1

OOM_HINT = (
    "lower hyperparameters.batch_size (raise gradient_accumulation_steps to keep the effective batch), "
    "set gradient_checkpointing: true, use method 'qlora', or lower hyperparameters.max_seq_len"
)


def run_job(spec: JobSpec, out_dir: str | Path, resume: bool = False, flags: StopFlags | None = None) -> int:
    from accelerate import Accelerator

    from trainer.loop import train
    from trainer.model import quiet_libraries

    quiet_libraries()
    out = Path(out_dir)
    cuda = torch.cuda.is_available()
    # Mixed precision is decided per device and spec inside train(); Accelerator needs it now.
    wants_bf16 = spec.precision == "bf16" or (spec.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(mixed_precision="bf16" if wants_bf16 else "no", cpu=not cuda)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    events = EventWriter(out / "events.jsonl", enabled=accelerator.is_main_process)
    flags = flags or StopFlags()
    try:
        with handle_signals(flags):
            try:
                train(spec, out, accelerator, events, resume=resume, flags=flags)
            except torch.cuda.OutOfMemoryError as exc:
                raise OutOfMemory(f"the GPU ran out of memory: {str(exc).splitlines()[0]}", hint=OOM_HINT) from exc
        return EXIT_OK
    except Stopped as stop:
        return stop.exit_code
    except TrainerError as err:
        events.emit("error", err.message, level="error", code=err.code, hint=err.hint)
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - the worker must get an event, not just a dead process
        traceback.print_exc()
        events.emit("error", f"internal error: {type(exc).__name__}: {exc}", level="error", code="internal",
                    hint="see trainer.log; this is a bug in tuneq, please report it")
        return EXIT_FAILED
    finally:
        events.close()
