"""The HTTP protocol the API is served with: uvicorn's, plus read deadlines for headers and bodies.

uvicorn closes idle keep-alive connections (`--timeout-keep-alive`) but waits forever for a
request that has begun: a client that sends half a header line and stops ("slow loris") holds a
connection, and a few hundred such hold the server. This protocol closes a connection whose
request headers are not complete within TUNEQ_API_HEADER_TIMEOUT_S of their first byte (or of
the connection's start), and one whose body stops arriving for TUNEQ_API_BODY_TIMEOUT_S, unless
the pause is the app's (uvicorn stops reading while the app has not taken the last chunk).

    uvicorn api.main:app --http api.server:GuardedHttpToolsProtocol

It also takes the keep-alive timeout from TUNEQ_API_KEEP_ALIVE_S, so every way of serving the API
(tuneq up, the container) gets the same limits from the same settings.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.settings import get_settings

PROTOCOL = "api.server:GuardedHttpToolsProtocol"  # uvicorn's --http


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout_s = settings.api_header_timeout_s
        self.body_timeout_s = settings.api_body_timeout_s
        self.timeout_keep_alive = settings.api_keep_alive_s
        self.read_deadline: asyncio.TimerHandle | None = None

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self.read_deadline = self.loop.call_later(seconds, self._read_timed_out, seconds)

    def _disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _read_timed_out(self, seconds: float) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            self._arm(seconds)  # the app is behind, not the client
            return
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        headers = dict(self.headers)
        has_body = headers.get(b"content-length", b"0").strip() not in (b"", b"0") or b"transfer-encoding" in headers
        if has_body:
            self._arm(self.body_timeout_s)
        else:
            self._disarm()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        self._arm(self.body_timeout_s)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Between requests the keep-alive timeout rules; the next request's first byte re-arms.
        self._disarm()
