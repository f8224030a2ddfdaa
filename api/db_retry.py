"""Run a read again when a database restart cut it off.

GET and HEAD change nothing, so running one twice is safe; the client then sees a short delay
instead of a 503. Writes are never repeated here: the client decides, told so by the 503's
Retry-After. A response that has begun to stream (SSE) is never retried.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

READS = ("GET", "HEAD")


class RetryReadsMiddleware:
    def __init__(self, app: ASGIApp, attempts: int = 3, wait_s: float = 1.0) -> None:
        self.app = app
        self.attempts = attempts
        self.wait_s = wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in READS:
            await self.app(scope, receive, send)
            return
        for attempt in range(1, self.attempts + 1):
            state = scope.setdefault("state", {})
            state.pop("database_unavailable", None)
            dropped = False
            last = attempt == self.attempts

            async def forward(message: Message) -> None:
                nonlocal dropped
                if message["type"] == "http.response.start" and not last and state.get("database_unavailable"):
                    dropped = True  # this answer is replaced by the next attempt's
                if not dropped:
                    await send(message)

            await self.app(scope, receive, forward)
            if not dropped:
                return
            await asyncio.sleep(self.wait_s * attempt)
