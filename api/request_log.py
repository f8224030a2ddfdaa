"""A request id on every answer, and one log line per server error.

A traceback per 500 made the API's log grow by hundreds of lines for each bad request a client
repeats. An unexpected error is caught here, before Starlette's outermost handler (which would
hand it on to the server to print in full): the log gets one line with the request id, which the
client also receives, and the traceback goes to the debug level.
"""

from __future__ import annotations

import logging
import re
import secrets

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("tuneq.api")

HEADER = "x-request-id"
# A client's own id is kept when it is short and plain; anything else could forge log lines.
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        request_id = given if _CLIENT_ID.match(given) else f"req_{secrets.token_hex(8)}"
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - every unexpected error becomes one line and a 500
            from api.errors import unexpected

            if started:  # a streamed answer broke off: nothing more can be sent
                log.error("error after the answer began on %s %s [%s]: %s", scope["method"], scope["path"],
                          request_id, one_line(exc))
                return
            response = unexpected(Request(scope), exc)
            await response(scope, receive, send_with_id)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
