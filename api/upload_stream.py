"""An upload's multipart body, streamed from the event loop into storage on one worker thread.

Starlette's form parsing runs on the event loop and spools the file to a temporary file (a
thread hop per 64 KiB chunk once it is large), and the route then copies that file into the
store: every byte is handled three times, part of it on the loop every other request needs.
Here the loop only hands the raw chunks as they arrive to a worker thread, at most DEPTH chunks
ahead of it (then the loop stops reading the socket, so a fast client cannot fill the memory);
the thread parses the multipart framing and writes the file's bytes straight into the store,
hashing them as it goes (`Storage.put_stream`). Nothing holds the whole body, in memory or on
disk, apart from its stored copy.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.errors import APIError, bad_request

DEPTH = 16  # raw body chunks between the loop and the thread (uvicorn's are up to 64 KiB)
FIELD_BYTES = 64 * 1024  # the form's other fields together (`purpose`)
_END = b""


class Pipe:
    """Body chunks from the event loop to one thread. The loop's `put` waits while DEPTH chunks
    are queued; `close` (the thread is done, or failed) lets it go on without queuing more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, depth: int = DEPTH):
        self.loop = loop
        self.items: queue.SimpleQueue[bytes | BaseException] = queue.SimpleQueue()
        self.room = asyncio.Semaphore(depth)
        self.closed = False

    async def put(self, item: bytes | BaseException) -> None:
        if self.closed:
            return
        await self.room.acquire()
        if not self.closed:
            self.items.put(item)

    def get(self) -> bytes:
        """On the thread: the next chunk, b"" at the end of the body; raises what the loop sent."""
        item = self.items.get()
        self.loop.call_soon_threadsafe(self.room.release)
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, exc: BaseException | None = None) -> None:
        """From the loop: the body will not come; the thread's next `get` raises."""
        self.items.put(exc or ConnectionAbortedError("the upload's request ended"))

    def close(self) -> None:
        """From the thread: the loop stops waiting for room."""

        def closed() -> None:
            self.closed = True
            self.room.release()  # wakes a put that waits; later puts return at once

        self.loop.call_soon_threadsafe(closed)


class MultipartFile:
    """The body's `file` part as a readable stream, parsed on demand from the pipe; the form's
    other (small) fields end up in `fields`. For the thread only."""

    def __init__(self, pipe: Pipe, boundary: bytes, max_file_bytes: int, too_large: Callable[[], APIError]):
        self.pipe, self.max_file_bytes, self.too_large = pipe, max_file_bytes, too_large
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.size = 0
        self.body_done = False
        self._chunks: list[bytes] = []  # file bytes parsed, not yet read
        self._part: dict[str, Any] = {}
        self._header: list[bytes] = [b"", b""]
        self._field_bytes = 0
        self._file_part_seen = self._file_done = False
        self._in_file = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": lambda d, s, e: self._header.__setitem__(0, self._header[0] + d[s:e]),
            "on_header_value": lambda d, s, e: self._header.__setitem__(1, self._header[1] + d[s:e]),
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        })

    # -- parser callbacks

    def _part_begin(self) -> None:
        self._part = {"name": None, "filename": None, "data": []}

    def _header_end(self) -> None:
        field, value = self._header
        self._header = [b"", b""]
        if field.strip().lower() == b"content-disposition":
            _, options = parse_options_header(value)
            self._part["name"] = options.get(b"name", b"").decode("utf-8", "replace")
            if b"filename" in options:
                self._part["filename"] = options[b"filename"].decode("utf-8", "replace")

    def _headers_finished(self) -> None:
        if self._part["name"] == "file" and self._part["filename"] is not None:
            if self._file_part_seen:
                raise bad_request("file: send one file per upload", "file")
            self._file_part_seen = self._in_file = True
            self.filename = self._part["filename"]

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.size += end - start
            if self.size > self.max_file_bytes:
                raise self.too_large()
            self._chunks.append(data[start:end])
            return
        self._field_bytes += end - start
        if self._field_bytes > FIELD_BYTES:
            raise bad_request(f"form fields: more than {FIELD_BYTES} bytes besides the file", None)
        self._part["data"].append(data[start:end])

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self._file_done = False, True
        elif self._part.get("name") is not None:
            self.fields[self._part["name"]] = b"".join(self._part["data"]).decode("utf-8", "replace")

    # -- reading

    def _feed(self) -> None:
        chunk = self.pipe.get()
        try:
            if chunk == _END:
                self.parser.finalize()
                self.body_done = True
            else:
                self.parser.write(chunk)
        except MultipartParseError as exc:  # the client's framing, not a fault of ours
            raise bad_request(f"file: the multipart body is malformed ({exc})", "file") from None

    def wait_for_file(self) -> bool:
        """Parse until the file part begins (True) or the body ends without one (False)."""
        while not self._file_part_seen and not self.body_done:
            self._feed()
        return self._file_part_seen

    def read(self, n: int = -1) -> bytes:
        while not self._chunks and not self._file_done and not self.body_done:
            self._feed()
        if not self._chunks:
            return b""
        data = self._chunks.pop(0)
        if 0 <= n < len(data):
            data, rest = data[:n], data[n:]
            self._chunks.insert(0, rest)
        return data

    def finish(self) -> None:
        """Parse the rest of the body (the fields after the file)."""
        while not self.body_done:
            self._feed()


async def feed(pipe: Pipe, body: AsyncIterator[bytes], done: asyncio.Future[Any]) -> None:
    """On the loop: the body's chunks into the pipe until it ends or the thread is done.
    An error while reading (the body cap, a client that went away) goes to the thread as well."""
    try:
        async for chunk in body:
            if done.done():
                return
            if chunk:
                await pipe.put(chunk)
        await pipe.put(_END)
    except BaseException as exc:
        pipe.abort(exc)
        raise
