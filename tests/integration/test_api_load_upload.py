"""An upload streams into storage while it arrives: the API never holds the body (in memory or
spooled to a temporary file) before storing it, and the event loop only passes chunks on."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import create_user_with_key
from tests.integration.conftest import ChunkedBody, upload_scope

pytestmark = pytest.mark.timeout(120)

LINE = (json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"},
                                 {"role": "assistant", "content": "cba"}]}) + "\n").encode()
CHUNK = 64 * 1024


def test_an_upload_reaches_storage_while_its_body_still_arrives(db_env: dict[str, str]) -> None:
    from api.main import create_app

    _, admin_key = create_user_with_key("uploader", "admin")

    boundary = "tuneqboundary"
    content = LINE * (3 * 1024 * 1024 // len(LINE))
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n").encode()
    chunks = [head] + [content[i:i + CHUNK] for i in range(0, len(content), CHUNK)] + [f"\r\n--{boundary}--\r\n".encode()]
    half = len(chunks) // 2
    sent_file_bytes = sum(len(c) for c in chunks[1:half])
    body = ChunkedBody(chunks, pause_at=half)  # the client pauses halfway
    scope = upload_scope(boundary, admin_key, (b"content-length", str(sum(map(len, chunks))).encode()))
    files = Path(db_env["TUNEQ_HOME"]) / "artifacts" / "files"

    def stored_so_far() -> int:
        return sum(p.stat().st_size for p in files.glob("*.part")) if files.is_dir() else 0

    async def main() -> None:
        app = asyncio.create_task(create_app()(scope, body.receive, body.send))
        # Halfway through the body, what arrived is in the store already (not in a spool file
        # that is copied into the store once the body is complete).
        for _ in range(600):
            if stored_so_far() >= sent_file_bytes:
                break
            assert not app.done(), body.answer
            await asyncio.sleep(0.1)
        assert stored_so_far() >= sent_file_bytes, f"{stored_so_far()} of {sent_file_bytes} bytes sent are stored"
        body.gate.set()
        await asyncio.wait_for(app, 60)

    asyncio.run(main())
    assert body.status() == 200, body.answer
    stored = body.json()
    assert stored["bytes"] == len(content) and stored["sha256"] == hashlib.sha256(content).hexdigest()
    assert stored["status"] == "processed" and not list(files.glob("*.part"))
