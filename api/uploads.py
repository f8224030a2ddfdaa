"""Refuse oversized uploads while they arrive, not after they have filled the disk."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import envelope
from core.settings import get_settings

# Multipart boundaries and the `purpose` field ride along with the file.
FORM_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/v1/files",)


def too_large_message(limit: int) -> str:
    return f"file: larger than the upload limit of {limit} bytes (TUNEQ_MAX_UPLOAD_BYTES)"


class UploadLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") not in UPLOAD_PATHS:
            await self.app(scope, receive, send)
            return
        file_limit = get_settings().max_upload_bytes
        limit = file_limit + FORM_OVERHEAD
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await envelope(413, too_large_message(file_limit), "file", "file_too_large")(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException from body parsing; the error handler
                    # turns it into the envelope.
                    raise HTTPException(413, too_large_message(file_limit))
            return message

        await self.app(scope, counting_receive, send)
