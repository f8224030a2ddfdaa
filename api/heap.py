"""The API process's garbage collector: what lives as long as the process out of its way, and
the garbage of requests collected while it is young.

A full collection of CPython's cyclic garbage collector walks every tracked object, holding the
interpreter lock: no request moves meanwhile. An API process holds well over a hundred thousand
objects once started, and several hundred thousand once it has loaded a tokenizer for a data
check (transformers and torch), so each full collection stopped every request for a tenth to a
quarter of a second of CPU, and under a steady load one came every few seconds.

Two changes keep it away:

- `settle()` moves the objects alive now (modules, the app, a loaded tokenizer: they live as
  long as the process) to the permanent generation (gc.freeze), where no collection walks them.
  It runs when the app starts and after a tokenizer is loaded; what requests leave behind is
  still collected as before. `release()` undoes it when the app stops, so a process that goes on
  (tests create and stop many apps) does not keep stopped apps' cycles.
- The youngest generation is collected after YOUNG allocations instead of 700: with 700, the
  objects of requests still in progress are promoted at nearly every collection, and promoted
  objects are what make a full collection due.
"""

from __future__ import annotations

import gc
import threading

YOUNG = 20_000

_lock = threading.Lock()


_collected = False


def configure() -> None:
    """At the app's start: the young threshold, then settle() (after one collection per process,
    so the garbage of start-up is not kept)."""
    global _collected
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(YOUNG, young), older, oldest)
    with _lock:
        if not _collected:
            gc.collect()
            _collected = True
    settle()


def settle() -> None:
    """Freeze every object alive now: no collection walks it until release(). No collection runs
    here (that would be the pause this avoids); what garbage exists now is kept, once."""
    with _lock:
        gc.freeze()


def release() -> None:
    with _lock:
        gc.unfreeze()
