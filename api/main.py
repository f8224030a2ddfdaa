"""The tuneq HTTP API: OpenAI's fine-tuning surface under /v1, plus tuneq's extensions."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api import docs_page, errors, heap, validation, warmup
from api.auth_gate import BodyAuthMiddleware
from api.body_limits import BodyLimitMiddleware
from api.db_retry import RetryReadsMiddleware
from api.request_log import RequestIdMiddleware
from api.routes import admin, artifacts, chat, checkpoints, events, files, health, hosts, jobs, models, plan
from api.routes import ui
from api.routes import metrics
from core.settings import get_settings
from api.load_shed import LoadShedMiddleware


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    heap.configure()  # what lives as long as the process, out of the garbage collector's walks
    # Data checks of jobs in validating_files that no live API process holds (one died).
    validation.CHECKER.run_in_background()
    # Before the first request: a job's creation must not pay for (or wait on) the imports of the
    # planner and the tokenizers (api.warmup). In a thread, so a signal still reaches the loop.
    await anyio.to_thread.run_sync(warmup.warm, get_settings())
    yield
    validation.CHECKER.stop()
    validation.stop_child()  # its checks are re-run by whichever API process adopts the jobs
    heap.release()


def create_app() -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="tuneq",
        version="0.1.0",
        summary="Self-hosted LLM fine-tuning with OpenAI's fine-tuning API.",
        docs_url=None, redoc_url=None,  # api.docs_page: off by default, with a CSP when on
    )
    errors.install(app)
    # Middleware runs in the reverse order of adding: shed load first (no work for a refused
    # request), then check the key of a request with a body, then cap the body as it is read.
    app.add_middleware(RetryReadsMiddleware)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(BodyAuthMiddleware)
    app.add_middleware(LoadShedMiddleware)
    # Outermost: errors anywhere inside get a request id and one log line.
    app.add_middleware(RequestIdMiddleware)
    for module in (files, jobs, plan, events, checkpoints, artifacts, models, chat, hosts, admin, health):
        app.include_router(module.router)
    ui.install(app)  # the browser dashboard at /ui
    docs_page.install(app, get_settings().api_docs)
    app.include_router(metrics.router)  # Prometheus /metrics, admins only
    return app


app = create_app()
