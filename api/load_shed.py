"""Answer overload at once: 503 with Retry-After instead of a queue that times everyone out.

A process that takes more requests than it can finish makes every one of them slow, and the
queue it builds outlives the burst (clients time out and retry into it). Past
TUNEQ_API_MAX_INFLIGHT requests in progress, a request is refused before any work is done for
it, so those admitted keep their latency and the service is normal as soon as the burst ends.
Event streams cost no thread or connection while open (api/event_hub.py), nor do chat
completions while an inference server answers them (api/chat.py); both are counted apart,
against TUNEQ_API_MAX_STREAMS. Health checks are never refused: a busy process is not a dead one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import envelope
from core.settings import get_settings

RETRY_AFTER_S = 1
NEVER_SHED = ("/healthz", "/readyz")


CHAT_PATH = "/v1/chat/completions"


def is_event_stream(scope: Scope) -> bool:
    """Event streams, and chat completions: both wait on Redis or the hub holding no thread."""
    if scope["path"].rstrip("/") == CHAT_PATH:
        return True
    return scope["path"].endswith("/events") and b"stream=true" in scope.get("query_string", b"").lower()


class LoadShedMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inflight = 0
        self.streams = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in NEVER_SHED:
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        stream = is_event_stream(scope)
        if stream and self.streams >= settings.api_max_streams:
            await self._busy(f"{self.streams} event streams are open on this server process, the most it serves "
                             "(TUNEQ_API_MAX_STREAMS)", scope, receive, send)
            return
        if not stream and self.inflight >= settings.api_max_inflight:
            await self._busy(f"{self.inflight} requests are in progress on this server process, the most it takes "
                             "at once (TUNEQ_API_MAX_INFLIGHT)", scope, receive, send)
            return
        if stream:
            self.streams += 1
        else:
            self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if stream:
                self.streams -= 1
            else:
                self.inflight -= 1

    @staticmethod
    async def _busy(why: str, scope: Scope, receive: Receive, send: Send) -> None:
        await envelope(503, f"the server is busy: {why}; retry in {RETRY_AFTER_S} s", None, "server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)})(scope, receive, send)
