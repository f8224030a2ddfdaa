"""The tuneq HTTP API: OpenAI's fine-tuning surface under /v1, plus tuneq's extensions."""

from __future__ import annotations

from fastapi import FastAPI

from api import docs_page, errors
from api.auth_gate import UploadAuthMiddleware
from api.db_retry import RetryReadsMiddleware
from api.request_log import RequestIdMiddleware
from api.routes import admin, artifacts, checkpoints, events, files, health, jobs, models, plan
from api.routes import ui
from api.routes import metrics
from api.uploads import UploadLimitMiddleware
from core.settings import get_settings


def create_app() -> FastAPI:
    app = FastAPI(
        title="tuneq",
        version="0.1.0",
        summary="Self-hosted LLM fine-tuning with OpenAI's fine-tuning API.",
        docs_url=None, redoc_url=None,  # api.docs_page: off by default, with a CSP when on
    )
    errors.install(app)
    app.add_middleware(RetryReadsMiddleware)
    app.add_middleware(UploadLimitMiddleware)
    # Added after the others, so it runs before them: no upload byte is read for a caller without a valid key.
    app.add_middleware(UploadAuthMiddleware)
    # Outermost: errors anywhere inside get a request id and one log line.
    app.add_middleware(RequestIdMiddleware)
    for module in (files, jobs, plan, events, checkpoints, artifacts, models, admin, health):
        app.include_router(module.router)
    ui.install(app)  # the browser dashboard at /ui
    docs_page.install(app, get_settings().api_docs)
    app.include_router(metrics.router)  # Prometheus /metrics, admins only
    return app


app = create_app()
