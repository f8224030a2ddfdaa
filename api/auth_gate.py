"""Authenticate uploads before their body is read.

FastAPI reads a request's form body before it runs the route's dependencies, so without this an
anonymous client could make the server spool a file as large as the upload limit before hearing
401. Other routes have small bodies and authenticate in their dependency (api.deps).
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import envelope
from api.uploads import UPLOAD_PATHS
from core.db import get_sessionmaker
from core.identity import authenticate


def _key_is_valid(token: str) -> bool:
    with get_sessionmaker()() as db:
        return authenticate(db, token) is not None


class UploadAuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS:
            scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                await envelope(401, "missing API key; send `Authorization: Bearer <key>`", None, "missing_api_key")(scope, receive, send)
                return
            if not await run_in_threadpool(_key_is_valid, token.strip()):
                await envelope(401, "invalid or revoked API key", None, "invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)
