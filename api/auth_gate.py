"""Authenticate every request that carries a body before a byte of that body is read.

FastAPI reads and parses a request's body (a JSON spec, an upload's form) before it runs the
route's dependencies, so without this an anonymous client could make the server read and parse
as much as the body cap allows before hearing 401. Requests without a body authenticate in
their dependency (api.deps); nothing is spent on them before it runs.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import envelope
from core.db import read_session
from core.identity import authenticate


def _key_is_valid(token: str) -> bool:
    with read_session() as db:
        return authenticate(db, token) is not None


def has_body(headers: Headers) -> bool:
    return headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers


class BodyAuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = Headers(scope=scope)
            if has_body(headers):
                scheme, _, token = (headers.get("authorization") or "").partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    await envelope(401, "missing API key; send `Authorization: Bearer <key>`", None, "missing_api_key")(scope, receive, send)
                    return
                if not await run_in_threadpool(_key_is_valid, token.strip()):
                    await envelope(401, "invalid or revoked API key", None, "invalid_api_key")(scope, receive, send)
                    return
        await self.app(scope, receive, send)
