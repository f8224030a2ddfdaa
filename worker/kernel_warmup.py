"""The worker's warm-up of the fast path's kernels: `python -m trainer warm-kernels` over the host's
local models, once, as the worker starts (trainer/kernel_warmup.py says what it runs and why).

It is a process of its own on the host's first GPU, gone once done: the trainer template must
not touch CUDA (its forks could not use it) and an idle standby holding a CUDA context would keep
its memory from every job. The worker counts as ready (GET /readyz?workers=N) once the warm-up
ended, however it ended: a failed warm-up only leaves the compiling to the first job, as before.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from core.model_roots import list_models
from core.settings import Settings
from worker.gpus import GpuPool, Reservation, gpu_driver_present
from worker.workdir import trainer_env

log = logging.getLogger("tuneq.worker")

# Models warmed at most: each costs a second or two; a host with more has its first job of the
# others compile, as without the warm-up.
MAX_MODELS = 8
TIMEOUT_S = 300.0


class KernelWarmup:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status = "off"
        self.report: dict[str, Any] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, settings: Settings, pool: GpuPool) -> None:
        """Start the warm-up on a GPU host with local models; a no-op elsewhere, or when it ran.
        A host without a GPU driver compiles no kernels (TUNEQ_GPUS there only counts job
        slots), so it starts nothing: the process would import torch for nothing."""
        if not settings.warm_kernels or pool.kind != "gpu" or not gpu_driver_present():
            return
        models = [str(m.path) for m in list_models(settings)
                  if (Path(m.path) / "config.json").is_file()][:MAX_MODELS]
        if not models:
            return
        with self.lock:
            if self.status != "off":
                return
            work = settings.resolved_work_dir()
            work.mkdir(parents=True, exist_ok=True)
            first = Reservation([0], device_ids=pool.device_ids[:1] if pool.device_ids else None)
            env = {**trainer_env(settings), **first.env(pool.kind)}
            with open(work / "kernel-warmup.log", "wb") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "trainer", "warm-kernels", *models], env=env,
                                             stdout=subprocess.PIPE, stderr=out, start_new_session=True)
            self.status = "warming"
        threading.Thread(target=self._wait, name="tuneq-kernel-warmup", daemon=True).start()

    def _wait(self) -> None:
        proc = self.proc
        assert proc is not None
        try:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        report = None
        for line in (out or b"").decode(errors="replace").splitlines()[::-1]:
            try:
                report = json.loads(line)
                break
            except ValueError:
                continue
        with self.lock:
            self.report = report
            self.status = "done" if proc.returncode == 0 else "failed"
        log.info("kernel warm-up %s (exit %s): %s", self.status, proc.returncode, report)

    def state(self) -> str:
        """off (nothing to warm), warming, done or failed: the worker's registry entry, so that
        GET /readyz?workers=N waits while it warms."""
        with self.lock:
            return self.status

    def close(self) -> None:
        with self.lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()


KERNELS = KernelWarmup()
