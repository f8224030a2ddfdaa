"""Download responses for stored content, whichever backend holds it."""

from __future__ import annotations

from urllib.parse import quote

from fastapi.responses import FileResponse, Response, StreamingResponse

from core.storage import LocalStorage, Storage


def stored_content(storage: Storage, key: str, *, size: int, media_type: str, filename: str,
                   headers: dict[str, str] | None = None) -> Response:
    if isinstance(storage, LocalStorage):
        # A file on this disk: FileResponse adds range requests and sendfile.
        return FileResponse(storage.path(key), media_type=media_type, filename=filename, headers=headers)
    # In a bucket: passed through chunk by chunk, never held whole (a full model is gigabytes).
    return StreamingResponse(storage.iter_bytes(key), media_type=media_type, headers={
        "Content-Length": str(size), "Content-Disposition": attachment(filename), **(headers or {}),
    })


def attachment(filename: str) -> str:
    quoted = quote(filename, safe="")
    if quoted == filename:
        return f'attachment; filename="{filename}"'
    return f"attachment; filename*=utf-8''{quoted}"
