"""The tuneq HTTP API: OpenAI's fine-tuning surface under /v1, plus tuneq's extensions."""

from __future__ import annotations

from fastapi import FastAPI

from api import errors
from api.auth_gate import UploadAuthMiddleware
from api.db_retry import RetryReadsMiddleware
from api.routes import admin, artifacts, checkpoints, events, files, health, hosts, jobs, models, plan
from api.routes import ui
from api.routes import metrics
from api.uploads import UploadLimitMiddleware


def create_app() -> FastAPI:
    app = FastAPI(
        title="tuneq",
        version="0.1.0",
        summary="Self-hosted LLM fine-tuning with OpenAI's fine-tuning API.",
    )
    errors.install(app)
    app.add_middleware(RetryReadsMiddleware)
    app.add_middleware(UploadLimitMiddleware)
    # Added last, so it runs first: no upload byte is read for a caller without a valid key.
    app.add_middleware(UploadAuthMiddleware)
    for module in (files, jobs, plan, events, checkpoints, artifacts, models, hosts, admin, health):
        app.include_router(module.router)
    ui.install(app)  # the browser dashboard at /ui
    app.include_router(metrics.router)  # Prometheus /metrics, admins only
    return app


app = create_app()
