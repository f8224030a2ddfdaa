"""What marks an upload: its routes and the limit's message (the cap itself: api.body_limits)."""

from __future__ import annotations

# Multipart boundaries and the `purpose` field ride along with the file.
FORM_OVERHEAD = 64 * 1024
UPLOAD_PATHS = ("/v1/files",)


def too_large_message(limit: int) -> str:
    return f"file: larger than the upload limit of {limit} bytes (TUNEQ_MAX_UPLOAD_BYTES)"
