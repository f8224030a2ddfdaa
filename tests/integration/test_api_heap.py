"""The API process keeps its long-lived objects out of the garbage collector's full walks."""

from __future__ import annotations

import gc
from pathlib import Path

from fastapi.testclient import TestClient


def test_the_app_freezes_its_heap_while_it_runs_and_releases_it_when_it_stops(db_env: dict[str, str]) -> None:
    from api import heap
    from api.main import create_app

    with TestClient(create_app()) as c:
        assert c.get("/healthz").status_code == 200
        # The app's and the modules' objects are out of reach of every collection...
        assert gc.get_freeze_count() > 10_000
        # ... and young garbage is collected after more allocations than CPython's 700.
        assert gc.get_threshold()[0] >= heap.YOUNG
    assert gc.get_freeze_count() == 0  # a stopped app's cycles can be collected again


def test_a_loaded_tokenizer_joins_the_frozen_heap(tiny_model_dir: Path) -> None:
    from api import data_check

    data_check.model_tokenizer.cache_clear()
    try:
        before = gc.get_freeze_count()
        tokenizer = data_check.model_tokenizer(str(tiny_model_dir))
        assert tokenizer is not None and gc.get_freeze_count() > before
    finally:
        data_check.model_tokenizer.cache_clear()
        gc.unfreeze()
