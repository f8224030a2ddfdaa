"""A fresh API process is warm before it takes its first request: the planner's imports and its
base models' shapes and tokenizers are loaded (api.warmup), and its checking child (api.validation)
is started with the data check's imports done. GET /readyz says so only once all of it is."""

from __future__ import annotations

import concurrent.futures
import sys
import time

import pytest
from fastapi.testclient import TestClient

from api import data_check, validation, warmup
from api.main import create_app
from core import workers
from core.model_roots import resolve_model


def child_modules() -> list[str]:
    """In the checking child: which of a data check's heavy modules it has imported."""
    return sorted(m for m in ("transformers", "tokenizers", "trainer.data.validate", "api.data_check")
                  if m in sys.modules)


def child_tokenizers() -> int:
    return data_check.model_tokenizer.cache_info().currsize


def test_a_fresh_api_is_warm_before_its_first_request(service_env: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.planning.shape import _model_shape_cached

    monkeypatch.setenv("TUNEQ_API_WARM_CHILD", "true")
    data_check.model_tokenizer.cache_clear()
    _model_shape_cached.cache_clear()
    with TestClient(create_app()) as client:
        # Before any request: this process's warm-up is done, the child's has begun.
        assert warmup.DONE.is_set()
        assert _model_shape_cached.cache_info().currsize == 1
        assert data_check.model_tokenizer.cache_info().currsize == 1
        assert validation.child_state() in ("warming", "ready")
        deadline = time.monotonic() + 300
        while (r := client.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
            assert r.json()["waiting_on"] == ["checking_child"], r.json()
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["checking_child"] == "ready", r.json()
        # The child imported what a data check runs and loaded the model's tokenizer before any job.
        assert validation.run_in_child(child_modules) == ["api.data_check", "tokenizers", "trainer.data.validate",
                                                          "transformers"]
        assert validation.run_in_child(child_tokenizers) == 1
    hits = data_check.model_tokenizer.cache_info().hits
    # The data check's own lookup (the path a job body's model resolves to) finds it loaded.
    data_check.model_tokenizer(resolve_model("tiny-llama"))
    assert data_check.model_tokenizer.cache_info().hits == hits + 1


def test_readiness_waits_for_the_checking_child_and_the_workers_standbys_and_template(service_env: dict[str, str],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app()) as client:
        assert client.get("/readyz").json()["checking_child"] == "off"  # the tests' default: started on demand
        assert client.get("/readyz").status_code == 200
        # A child still importing: not ready.
        monkeypatch.setattr(validation, "_warm_dirs", [])
        monkeypatch.setattr(validation, "_warming", concurrent.futures.Future())
        assert client.get("/readyz").json()["waiting_on"] == ["checking_child"]
        validation._warming.set_result(1.0)
        assert client.get("/readyz").status_code == 200
        # Workers, when asked for: none registered yet, then one whose standby is importing, then ready.
        assert client.get("/readyz?workers=1").json()["waiting_on"] == ["workers"]
        workers.register("w1", "h1", 1, "gpu", 30, standby={"wanted": 2, "ready": 1})
        r = client.get("/readyz?workers=1")
        assert r.status_code == 503 and (r.json()["workers"], r.json()["workers_ready"]) == (1, 0)
        assert (r.json()["standbys_wanted"], r.json()["standbys_ready"]) == (2, 1)
        workers.register("w1", "h1", 1, "gpu", 30, standby={"wanted": 2, "ready": 2})
        assert client.get("/readyz?workers=1").status_code == 200
        # Its trainer template still importing, or its kernels still warming: not ready. A template
        # ready or gone (jobs start another way), kernels done or failed (the first job compiles
        # them), either off: ready.
        for field, busy, counter, ended in (("template", "importing", "templates_importing", ("ready", "gone", "off")),
                                            ("kernels", "warming", "kernels_warming", ("done", "failed", "off"))):
            workers.register("w1", "h1", 1, "gpu", 30, standby={"wanted": 2, "ready": 2}, **{field: busy})
            r = client.get("/readyz?workers=1")
            assert r.status_code == 503 and (r.json()["workers_ready"], r.json()[counter]) == (0, 1), field
            for state in ended:
                workers.register("w1", "h1", 1, "gpu", 30, standby={"wanted": 2, "ready": 2}, **{field: state})
                assert client.get("/readyz?workers=1").status_code == 200, (field, state)
        assert client.get("/readyz").status_code == 200  # a probe that leaves workers out
