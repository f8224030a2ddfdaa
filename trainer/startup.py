"""How long a run took to reach its first step, phase by phase, for the "startup" event.

Phases, each the seconds since the one before: import (from the process's start, or the job's
arrival at a standby process, to the recipe's setup: the interpreter, torch, transformers,
accelerate), data (tokenizer, reading, tokenizing,
packing), load (the model's weights onto the device, the method and fast path applied), prepare
(optimizer, schedule, resume, forgetting baseline) and first_step (until the first optimizer step's
values are read: kernels' first compilation and the allocator's warm-up included). The worker adds
what happens before the process exists (queue, launch).

The GPU's context (and its BLAS library) is made by a background thread while the libraries
import and the data loads (warm_device): the main thread's first use of the GPU then finds it
ready instead of paying for it inside the data or load phase.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def process_started() -> float:
    """When this process began (epoch seconds), from /proc; the import of this module elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()

# Set when a standby process (trainer.standby) took the job: the run's start is when the job
# arrived, not when the process began; the standby's own import is kept for the detail.
_STANDBY: dict[str, float] | None = None


def from_standby(received: float, imported_s: float, idle_s: float, forked: bool = False) -> None:
    """`forked`: the process is a child of the trainer template (trainer.template), whose import
    and idle time the detail then gives."""
    global _STANDBY
    _STANDBY = {"received": received, "standby_import": round(imported_s, 3), "standby_idle": round(idle_s, 3),
                "forked": forked}


def run_started() -> float:
    """When this run began: the process's start, or the job's arrival at a standby."""
    return _STANDBY["received"] if _STANDBY is not None else process_started()


def standby_detail() -> dict[str, object]:
    """For the startup event's detail: whether a standby (or a fork of the template) ran the job,
    how long it had imported for and how long it waited for the job."""
    if _STANDBY is None:
        return {"standby": False, "forked": False}
    return {"standby": True, "forked": bool(_STANDBY["forked"]), "standby_import": _STANDBY["standby_import"],
            "standby_idle": _STANDBY["standby_idle"]}


class Phases:
    """Marks the end of each phase; `seconds()` is the time each took, in order."""

    def __init__(self, started: float | None = None) -> None:
        self.started = run_started() if started is None else started
        self._last = self.started
        self._took: dict[str, float] = {}
        self._noted = self.started
        self.detail: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.time()
        self._took[name] = round(max(now - self._last, 0.0), 3)
        self._last = self._noted = now

    def note(self, name: str) -> None:
        """A part of the phase under way (the seconds since the last mark or note), for `detail`."""
        now = time.time()
        self.detail[name] = round(max(now - self._noted, 0.0), 3)
        self._noted = now

    def seconds(self) -> dict[str, float]:
        return dict(self._took)

    def total(self) -> float:
        return round(self._last - self.started, 3)


class DeviceWarmup:
    """Creates this rank's CUDA context and BLAS handle on a daemon thread (the tensor ops release
    the GIL, so imports and data loading go on meanwhile). Failures are left for the main thread to
    meet and report the usual way; `seconds` is when it was done, from the process's start."""

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> DeviceWarmup:
        self._thread = threading.Thread(target=self._run, name="tuneq-device-warmup", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            import torch

            if not torch.cuda.is_available():
                return
            index = int(os.environ.get("LOCAL_RANK", "0") or 0)
            if index >= torch.cuda.device_count():
                return
            device = torch.device("cuda", index)
            a = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
            (a @ a).sum().item()
            self.seconds = round(time.time() - run_started(), 3)
        except Exception as exc:  # noqa: BLE001 - the main thread meets the same fault and reports it
            self.error = f"{type(exc).__name__}: {exc}"[:200]

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


_WARMUP: DeviceWarmup | None = None


def warm_device() -> DeviceWarmup:
    """Start the warm-up once per process; later calls return the same one."""
    global _WARMUP
    if _WARMUP is None:
        _WARMUP = DeviceWarmup().start()
    return _WARMUP


def warmup_seconds() -> float | None:
    return _WARMUP.seconds if _WARMUP is not None else None


def kernel_cache_dir() -> Path:
    """Where Triton keeps the kernels it compiled (its own default unless TRITON_CACHE_DIR says)."""
    return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def kernel_cache_entries(folder: Path | None = None) -> int | None:
    """How many compiled kernels Triton's on-disk cache (or `folder`, a cache of another process)
    holds; None when it cannot be read."""
    try:
        return sum(1 for _ in (folder or kernel_cache_dir()).iterdir())
    except FileNotFoundError:
        return 0
    except OSError:
        return None


def kernel_names(folder: Path | None = None) -> list[tuple[str, float]]:
    """(kernel name, when written) of each entry of Triton's cache (or `folder`) that names one: an
    entry is a folder named by its hash, holding <kernel>.json beside the binaries (and
    __grp__<kernel>.json, an index); the compiled launchers hold no such file."""
    found = []
    root = folder or kernel_cache_dir()
    for entry in root.iterdir() if root.is_dir() else ():
        metas = [f for f in entry.glob("*.json") if not f.name.startswith("__grp__")] if entry.is_dir() else []
        if metas:
            found.append((metas[0].stem, max(f.stat().st_mtime for f in entry.iterdir())))
    return found


def kernel_cache_added(before: int | None) -> int | None:
    """Kernels compiled into the cache since `before` was counted: a run that finds its kernels
    there adds none, one that compiles them pays seconds for it in its first step. Another process
    of the host compiling meanwhile counts too."""
    after = kernel_cache_entries()
    return None if before is None or after is None else after - before


def skip_unused_libraries(spec: Any, modules: dict[str, Any] | None = None) -> list[str]:
    """Hide optional libraries this run does not use from transformers, peft and accelerate, which
    import them at their own import when installed; the names hidden.

    peft imports bitsandbytes, whose import compiles its kernels' wrappers with torch.compile and so
    loads torch's compiler stack: about a quarter of a tiny model's start on CPU. accelerate imports
    boto3 for its SageMaker launcher. A hidden module looks not installed (`find_spec` is None), so
    the libraries take their paths without it. bitsandbytes stays for qlora, its optimizers and a
    base stored quantized (a config with `quantization_config`, or one that cannot be read here).
    For a process of the trainer's own only: the modules are hidden from everything in it.
    """
    from trainer.vocabulary import BITSANDBYTES_OPTIMIZERS

    hidden = ["boto3"]
    if spec.method != "qlora" and spec.optimizer not in BITSANDBYTES_OPTIMIZERS and not _stored_quantized(spec.model):
        hidden.append("bitsandbytes")
    return hide_libraries(hidden, modules)


def hide_libraries(names: list[str], modules: dict[str, Any] | None = None) -> list[str]:
    """Hide `names` (those not imported yet) as skip_unused_libraries does; the names hidden."""
    own = modules is None
    modules = sys.modules if modules is None else modules
    hidden = [name for name in names if name not in modules]
    for name in hidden:
        modules[name] = None
    if own:
        _SKIPPED[:] = hidden
    return hidden


_SKIPPED: list[str] = []


def skipped_libraries() -> list[str]:
    """What skip_unused_libraries hid from this process (the startup event's detail says it)."""
    return list(_SKIPPED)


def _stored_quantized(model: str) -> bool:
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # not a local model directory: leave everything a remote one might need
    return not isinstance(config, dict) or "quantization_config" in config
