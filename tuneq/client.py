"""A small synchronous client of the tuneq HTTP API (httpx only, so it installs anywhere)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import httpx

from tuneq import config

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_HINT = "set TUNEQ_API_KEY, or run `tuneq config --api-key KEY`"
# A stream is silent between events except for the server's ping every 15 s. A plain
# (connect, read, write, pool) tuple, not httpx.Timeout: the client handed in may be httpx2's
# (Starlette's TestClient, huggingface_hub's stack), which refuses the other package's Timeout.
STREAM_TIMEOUT = (10.0, 60.0, 10.0, 10.0)
# A chat answer starts once an inference server takes it (the server waits up to its queue
# timeout, then loads the model): allow longer for it than for an event.
CHAT_TIMEOUT = (10.0, 300.0, 10.0, 10.0)


def key_files() -> list[Path]:
    """Where a key is looked for after $TUNEQ_API_KEY and the config file: a key file of its own,
    then `tuneq up`'s admin key."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [config_home / "tuneq" / "api_key", Path(os.environ.get("TUNEQ_HOME") or "var") / "admin.key"]


def find_api_key() -> str | None:
    """$TUNEQ_API_KEY, else the config file's api_key, else the first key file that has one."""
    key, _ = config.setting("api_key")
    if key:
        return key
    for path in key_files():
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


def _transport_errors() -> tuple[type[Exception], ...]:
    """The network errors of every HTTP client that can be in play: httpx's, and httpx2's once
    anything has loaded it (a client object of it can only exist then)."""
    fork = sys.modules.get("httpx2")
    return (httpx.TransportError, fork.TransportError) if fork else (httpx.TransportError,)


class TuneqError(Exception):
    """Anything a user should read as one line: an API error, an unreachable server, a bad file."""


class APIError(TuneqError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class Client:
    """`http`, when given, is any client of httpx's API: an httpx.Client, an httpx2.Client, or
    Starlette's TestClient (built on whichever of the two is installed)."""

    def __init__(self, base_url: str | None = None, *, http: httpx.Client | None = None, timeout: float = 60,
                 api_key: str | None = None):
        self.base_url = (base_url or config.setting("url")[0] or DEFAULT_URL).rstrip("/")
        self.http = http or httpx.Client(base_url=self.base_url, timeout=timeout)
        key = api_key or find_api_key()
        if key:
            self.http.headers["Authorization"] = f"Bearer {key}"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except _transport_errors() as exc:
            raise TuneqError(f"cannot reach tuneq at {self.base_url} ({type(exc).__name__}); is `tuneq up` running? set TUNEQ_URL") from None
        _raise_for_error(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise TuneqError(f"{self.base_url}{path} did not answer with JSON; is TUNEQ_URL a tuneq server?") from None

    def _items(self, path: str, limit: int, params: dict[str, Any] | None = None,
               after: str | None = None) -> Iterator[dict[str, Any]]:
        """A list route's items in its order, following its pages (`has_more`, `after`): a server
        serves at most its own page size (TUNEQ_PAGE_LIMIT_MAX) of a larger limit."""
        while True:
            page = self._json("GET", path, params={**(params or {}), "limit": limit, **({"after": after} if after else {})})
            yield from page["data"]
            if not page.get("has_more") or not page["data"]:
                return
            after = page["data"][-1]["id"]

    def _newest(self, path: str, limit: int, params: dict[str, Any] | None = None,
                after: str | None = None) -> list[dict[str, Any]]:
        """The first `limit` items of a list route (newest first), over as many pages as it takes."""
        return list(islice(self._items(path, limit, params, after), limit))

    # -- resources

    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with open(path, "rb") as f:
            return self._json("POST", "/v1/files", files={"file": (path.name, f, "application/jsonl")}, data={"purpose": purpose})

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/files/{file_id}")

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/fine_tuning/jobs", json=body)

    def plan_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/fine_tuning/plan", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def list_jobs(self, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
        return self._newest("/v1/fine_tuning/jobs", limit, {"status": status} if status else None)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def pause_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/pause")

    def resume_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/resume")

    def events(self, job_id: str, limit: int = 20, after: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` events (OpenAI's order), or those older than the event `after`."""
        return self._newest(f"/v1/fine_tuning/jobs/{job_id}/events", limit, after=after)

    def events_since(self, job_id: str, since: str | None, limit: int = 20) -> list[dict[str, Any]]:
        """Events newer than the event `since`, oldest first (without it: the newest `limit`)."""
        if since is None:
            return list(reversed(self.events(job_id, limit)))
        newer: list[dict[str, Any]] = []
        for ev in self._items(f"/v1/fine_tuning/jobs/{job_id}/events", 100):
            if ev["id"] == since:
                break
            newer.append(ev)
        return list(reversed(newer))

    def stream_events(self, job_id: str, after: str | None = None, limit: int = 20) -> Iterator[dict[str, Any]]:
        """The job's events as the server streams them (SSE), oldest first, until the job ends.

        `after`: resume after that event (sent as Last-Event-ID); without it the stream starts
        with the newest `limit` events. Returns when the server says the job ended.
        """
        path = f"/v1/fine_tuning/jobs/{job_id}/events"
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": after} if after else {})}
        try:
            with self.http.stream("GET", path, params={"stream": "true", "limit": limit}, headers=headers,
                                  timeout=STREAM_TIMEOUT) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                for name, data in _sse_messages(r.iter_lines()):
                    if name == "end":
                        return
                    if name == "error":  # the server ended it: the key was revoked, or access lost
                        raise TuneqError(f"the event stream ended: {json.loads(data)['error']['message']}")
                    if name == "message" and data:
                        yield json.loads(data)
        except _transport_errors() as exc:
            raise TuneqError(f"the event stream from {self.base_url} broke off ({type(exc).__name__})") from None
        raise TuneqError(f"the event stream from {self.base_url} ended before the job did")

    def chat(self, body: dict[str, Any]) -> Iterator[str]:
        """The answer's text as the server streams it (`stream` is set here)."""
        try:
            with self.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                                  headers={"Accept": "text/event-stream"}, timeout=CHAT_TIMEOUT) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                for _, data in _sse_messages(r.iter_lines()):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"] or {}
                        raise APIError(500, err.get("message") or "the answer broke off", err.get("param"), err.get("code"))
                    for choice in chunk.get("choices") or []:
                        if (choice.get("delta") or {}).get("content"):
                            yield choice["delta"]["content"]
        except _transport_errors() as exc:
            raise TuneqError(f"the answer from {self.base_url} broke off ({type(exc).__name__})") from None
        raise TuneqError(f"the answer from {self.base_url} ended without [DONE]")

    def list_files(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._newest("/v1/files", limit)

    def get_file(self, file_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/files/{file_id}")

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}/artifacts")["data"]

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["data"]

    def hosts(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/hosts")["data"]

    def download_artifact(self, job_id: str, artifact: dict[str, Any], dest: Path) -> Path:
        """Stream an artifact to `dest` and check its sha256 against the listing."""
        digest = hashlib.sha256()
        path = f"/v1/fine_tuning/jobs/{job_id}/artifacts/{artifact['id']}/content"
        try:
            with self.http.stream("GET", path) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                with open(dest, "wb") as out:
                    for chunk in r.iter_bytes():
                        digest.update(chunk)
                        out.write(chunk)
        except _transport_errors() as exc:
            raise TuneqError(f"download of {artifact['name']} from {self.base_url} failed ({type(exc).__name__})") from None
        if artifact.get("sha256") and digest.hexdigest() != artifact["sha256"]:
            raise TuneqError(f"{artifact['name']}: sha256 mismatch after download; try again")
        return dest


def _sse_messages(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each message of a text/event-stream; comments (pings) are skipped."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


def _raise_for_error(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        message, param, code = err.get("message") or r.reason_phrase, err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param, code = f"HTTP {r.status_code} {r.reason_phrase}", None, None
    if r.status_code == 401:
        message = f"{message}; {KEY_HINT}"
    raise APIError(r.status_code, message, param, code)

