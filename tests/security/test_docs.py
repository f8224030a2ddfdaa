"""/docs shares its origin with /ui (which keeps the API key): off by default, under a CSP when on."""

from __future__ import annotations

from fastapi.testclient import TestClient


def test_docs_are_off_by_default(service_env) -> None:  # noqa: ANN001
    from api.main import create_app

    with TestClient(create_app()) as c:
        assert c.get("/docs").status_code == 404
        assert c.get("/redoc").status_code == 404
        assert c.get("/openapi.json").status_code == 200  # data, no scripts


def test_docs_when_on_run_only_pinned_cdn_files_and_their_own_script(service_env, monkeypatch) -> None:  # noqa: ANN001
    from api.main import create_app
    from tests.conftest import reset_caches

    monkeypatch.setenv("TUNEQ_API_DOCS", "true")
    reset_caches()
    with TestClient(create_app()) as c:
        r = c.get("/docs")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'sha256-" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "swagger-ui-dist@5." in r.text and "swagger-ui-dist@5/" not in r.text  # a pinned version
    assert "fastapi.tiangolo.com" not in r.text
