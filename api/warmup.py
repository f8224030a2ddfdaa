"""The API's first job creation should cost what every later one costs.

Creating a job plans it, and the planner counts the model's shape on a meta-device model
(trainer.planning.shape): the first plan of a process imports torch and transformers' model
classes. A small file's data check, in the request, loads the model's tokenizer. Those imports
take seconds on any machine and tens of seconds on a busy one.

They are done at start-up, before the API takes requests (FastAPI's lifespan), for the newest
local base models: the planner's imports and each model's shape, then its tokenizer, into the
caches the requests read (trainer.planning.shape.model_shape, api.data_check.model_tokenizer).
A warm-up running beside the requests would not spare them: a request needs the same modules,
waits on their import locks while the warm-up thread imports them, and shares the interpreter
with it. The checking child (api.validation), which tokenizes the large files in a process of its
own, is started at the same time and warms itself there while the API already answers.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from api import data_check, heap
from core.model_roots import list_models
from core.settings import Settings

log = logging.getLogger("tuneq.api")

# Set once this process's own warm-up is done (GET /readyz).
DONE = threading.Event()
TIMES: dict[str, float] = {}


def known_models(settings: Settings) -> list[Any]:
    """The newest local base models, as many as the tokenizer cache holds."""
    models = sorted(list_models(settings), key=lambda m: m.created_at, reverse=True)
    return models[: data_check.model_tokenizer.cache_info().maxsize or 1]


def warm_planner(models: list[Any]) -> list[str]:
    """The planner's imports and each model's shape, as the first plan of a job would make them."""
    # Even with no local model yet: one added later is planned with the same libraries.
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from trainer.planning.shape import local_config, model_shape

    planned = []
    for model in models:
        try:
            config = local_config(str(model.path))
            if config is not None:
                model_shape(config)
                planned.append(model.name)
        except Exception as exc:  # noqa: BLE001 - a model the planner cannot read is the plan's to report
            log.info("warm-up: no shape for %s (%s)", model.name, exc)
    return planned


def warm_tokenizers(settings: Settings, models: list[Any] | None = None) -> list[str]:
    """Load the tokenizers of the newest local base models (as many as the cache holds)."""
    loaded = []
    for model in known_models(settings) if models is None else models:
        try:
            data_check.model_tokenizer(str(model.path))
            loaded.append(model.name)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is the data check's to report
            log.info("warm-up: no tokenizer for %s (%s)", model.name, exc)
    return loaded


def warm(settings: Settings) -> dict[str, float]:
    """This process's warm-up, then the start of the checking child's (both before requests)."""
    from api import validation

    began = time.monotonic()
    models = known_models(settings)
    if settings.api_warm_child:
        # First: the child imports in its own process while this one does the same here.
        validation.warm_child([str(Path(m.path)) for m in models])
    planned = warm_planner(models)
    TIMES["planner_s"] = round(time.monotonic() - began, 3)
    loaded = warm_tokenizers(settings, models)
    TIMES["api_s"] = round(time.monotonic() - began, 3)
    # What was just imported and loaded lives as long as the process: out of the collector's
    # sight, the full collections that requests trigger no longer walk it (pauses of the loop).
    heap.settle()
    DONE.set()
    log.info("warm-up done in %.1f s: shapes of %s, tokenizers of %s", TIMES["api_s"], planned or "none",
             loaded or "none")
    return TIMES
