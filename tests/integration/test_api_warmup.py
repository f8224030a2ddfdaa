"""A fresh API process loads its base models' tokenizers in the background at start-up, so the
first job's data check does not pay for transformers' tokenizer imports inside the request."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from api import data_check
from api.main import create_app
from core.model_roots import resolve_model


def test_a_fresh_api_has_the_models_tokenizer_before_any_job(service_env: dict[str, str]) -> None:
    data_check.model_tokenizer.cache_clear()
    with TestClient(create_app()) as client:
        for thread in [t for t in threading.enumerate() if t.name == "tuneq-warmup"]:
            thread.join(120)
        assert client.get("/healthz").status_code == 200
    assert data_check.model_tokenizer.cache_info().currsize == 1
    hits = data_check.model_tokenizer.cache_info().hits
    # The data check's own lookup (the path a job body's model resolves to) finds it loaded.
    data_check.model_tokenizer(resolve_model("tiny-llama"))
    assert data_check.model_tokenizer.cache_info().hits == hits + 1
