"""Single changes to a job that does not fit that would make it fit, each with its estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.planning.memory import MemoryEstimate
from trainer.planning.shape import gib
from trainer.spec import WHOLE_WEIGHT_METHODS

if TYPE_CHECKING:
    from trainer.planning.plan import Search

# More GPUs to suggest for sharded full fine-tuning.
GPU_COUNTS = (2, 4, 8, 16, 32, 64)


def _suggestion(kind: str, value: Any, e: MemoryEstimate, text: str) -> dict[str, Any]:
    return {"change": kind, "value": value, "total_bytes": e.total, "text": f"{text} ({gib(e.total)})"}


def longest_seq_len(search: Search, method: str, batch: int, speed: str) -> int | None:
    """The longest max_seq_len (a multiple of 64, when that is at least 64) that fits, by bisection."""
    lo, hi = 0, search.spec.hyperparameters.max_seq_len - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if search.estimate(method, batch, speed=speed, seq=max(8, mid // 64 * 64 or mid)).total <= search.usable:
            lo = mid
        else:
            hi = mid - 1
    return (lo // 64 * 64 or lo) if lo >= 8 else None


def suggest(search: Search, method: str, batch: int, speed: str) -> list[dict[str, Any]]:
    from trainer.planning.plan import AUTO_METHODS

    usable = search.usable
    out: list[dict[str, Any]] = []
    if speed == "fast":
        e = search.estimate(method, batch, speed="lean")
        if e.total <= usable:
            out.append(_suggestion("gradient_checkpointing", True, e, "speed lean (gradient_checkpointing true)"))
    smaller = batch // 2
    while smaller >= 1:
        e = search.estimate(method, smaller, speed=speed)
        if e.total <= usable:
            out.append(_suggestion("batch_size", smaller, e, f"batch_size {smaller}"))
            break
        smaller //= 2
    seq = longest_seq_len(search, method, batch, speed)
    if seq is not None:
        e = search.estimate(method, batch, speed=speed, seq=seq)
        out.append(_suggestion("max_seq_len", seq, e, f"max_seq_len {seq}"))
    if method in WHOLE_WEIGHT_METHODS:
        # Only sharding lowers the memory per GPU; DDP replicates everything.
        for gpus in GPU_COUNTS:
            if gpus <= search.gpus:
                continue
            e = search.estimate(method, batch, speed=speed, gpus=gpus, strategy="fsdp")
            if e.total <= usable:
                out.append(_suggestion("gpus", gpus, e, f"{gpus} GPUs with FSDP full sharding"))
                break
    ladder = AUTO_METHODS[AUTO_METHODS.index(method) + 1:] if method in AUTO_METHODS else ("lora", "qlora")
    for lighter in ladder:
        e = search.estimate(lighter, batch, speed=speed)
        if e.total <= usable:
            out.append(_suggestion("method", lighter, e, f"method {lighter}"))
            break
    if not out and speed == "fast":
        # Nothing single fits: try the strongest combination we can offer.
        e = search.estimate("qlora", 1, speed="lean")
        if e.total <= usable:
            out.append(_suggestion("combination", {"method": "qlora", "batch_size": 1, "gradient_checkpointing": True},
                                   e, "method qlora with batch_size 1 and speed lean (gradient_checkpointing true)"))
    return out
