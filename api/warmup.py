"""The API's first job creation should cost what every later one costs.

A job's data check tokenizes its files with the model's tokenizer, and the first tokenizer an API
process loads pays for importing transformers' tokenizer machinery (seconds on any machine, tens
of seconds on a busy one). That used to land inside the first POST /v1/fine_tuning/jobs of every
fresh API process. Instead, a background thread loads the tokenizers of the local base models at
start-up, into the same cache the data check reads (api.data_check.model_tokenizer), while the
API already answers requests.
"""

from __future__ import annotations

import logging
import threading

from api import data_check, heap
from core.model_roots import list_models
from core.settings import Settings

log = logging.getLogger("tuneq.api")


def warm_tokenizers(settings: Settings) -> list[str]:
    """Load the tokenizers of the newest local base models (as many as the cache holds)."""
    models = sorted(list_models(settings), key=lambda m: m.created_at, reverse=True)
    loaded = []
    for model in models[: data_check.model_tokenizer.cache_info().maxsize or 1]:
        try:
            data_check.model_tokenizer(str(model.path))
            loaded.append(model.name)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is the data check's to report
            log.info("warm-up: no tokenizer for %s (%s)", model.name, exc)
    # What was just imported and loaded lives as long as the process: out of the collector's
    # sight, the full collections that requests trigger no longer walk it (pauses of the loop).
    heap.settle()
    return loaded


def start(settings: Settings) -> threading.Thread:
    thread = threading.Thread(target=warm_tokenizers, args=(settings,), name="tuneq-warmup", daemon=True)
    thread.start()
    return thread
