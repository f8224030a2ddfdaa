"""`python -m trainer standby`: a trainer process started before its job, waiting for it.

The worker keeps one ready (worker/standby.py) so that a one-process job does not pay for the
interpreter and the imports of torch, transformers, peft, accelerate and the trainer's own modules
on its way to the first step. The standby imports all of those, writes READY on stdout, then
blocks on one JSON line on stdin:

    {"argv": ["run", SPEC, "--out", DIR, ...], "env": {...}, "cwd": DIR, "log": DIR/trainer.log}

On receipt it takes the job's environment as its own (TUNEQ_* switches and the like, read at run
time, not at import), moves into the job's directory, sends its output into the job's log and runs exactly what `python -m trainer run ...` runs; its exit code is
the trainer's. The worker then supervises it like any trainer (same process group, signals and
pause file), and finds it by its working directory (worker.process.trainer_pids).

The standby is started with its job's CUDA_VISIBLE_DEVICES already set: the worker keeps one per
GPU it expects the next job to get, and hands a job only to a standby of the job's own devices.
The variable cannot be changed on receipt, because the imports already talk to the driver: peft
imports bitsandbytes, which asks torch for the devices' compute capability at import, and with
that CUDA has read CUDA_VISIBLE_DEVICES for the life of the process. Reading device properties
needs no CUDA context; the trainer's warm-up makes one once the job arrived.

An end of input without a job (the worker let it go) ends it with code 0; the supervisor's death
ends it like any trainer (trainer.watchdog).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

READY = "ready"


def preload(liger: bool = True) -> None:
    """Import what a run imports, the tokenizer and model classes of transformers included.

    liger: its kernels too. Their op modules initialise CUDA at import (seen on the lent H200 with
    liger-kernel 0.8.5), which a standby may do, having its job's devices already, and the trainer
    template may not: a driver initialised before a fork is unusable in the children."""
    import torch  # noqa: F401

    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
    from transformers.models.llama import modeling_llama, tokenization_llama  # noqa: F401

    import trainer.cli  # noqa: F401
    import trainer.data.validate  # noqa: F401
    import trainer.distributed  # noqa: F401
    import trainer.job  # noqa: F401
    import trainer.loop  # noqa: F401
    import trainer.methods  # noqa: F401
    from trainer.fastpath import liger_module
    from trainer.model import quiet_libraries

    if liger:
        liger_module()
    quiet_libraries()


def take_job(job: dict[str, Any]) -> list[str]:
    """Become the job's process: its environment, directory and log; returns its trainer argv."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in job["env"].items()})
    os.chdir(job["cwd"])
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    argv = [str(a) for a in job["argv"]]
    sys.argv = ["trainer", *argv]
    return argv


def main() -> int:
    from trainer import startup
    from trainer.watchdog import watch_supervisor

    watch_supervisor()  # an idle standby ends with its worker too
    began = startup.process_started()
    preload()
    ready = time.time()
    print(READY, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0
    received = time.time()
    argv = take_job(json.loads(line))
    startup.from_standby(received, imported_s=ready - began, idle_s=received - ready)
    from trainer.cli import main as trainer_main

    return trainer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
