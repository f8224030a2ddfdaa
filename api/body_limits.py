"""Per-route request body caps, enforced while the body arrives, before anything parses it.

Uploads may be as large as TUNEQ_MAX_UPLOAD_BYTES; every other route takes a JSON body of at
most TUNEQ_MAX_JSON_BODY_BYTES (a job spec is a few KiB). A declared Content-Length over the cap
is refused before a byte is read; a body that grows past it (chunked, or lying about its
length) is cut off as soon as it does, so no cap's worth of memory or disk is ever spent on it.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BodyTooLarge, envelope
from api.uploads import FORM_OVERHEAD, UPLOAD_PATHS, too_large_message
from core.settings import get_settings


def body_cap(scope: Scope) -> tuple[int, str, str | None, str]:
    """(bytes allowed, the message when over, param, code) for this request."""
    settings = get_settings()
    if scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS:
        return settings.max_upload_bytes + FORM_OVERHEAD, too_large_message(settings.max_upload_bytes), "file", "file_too_large"
    limit = settings.max_json_body_bytes
    return limit, f"request body: larger than the limit of {limit} bytes (TUNEQ_MAX_JSON_BODY_BYTES)", None, "body_too_large"


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message, param, code = body_cap(scope)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await envelope(413, message, param, code)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # Raised into whatever reads the body (form or JSON parsing); the error
                    # handler turns it into the envelope.
                    raise BodyTooLarge(message, param, code)
            return msg

        await self.app(scope, counting_receive, send)
