"""A small synchronous client of the tuneq HTTP API (httpx only, so it installs anywhere)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
KEY_HINT = "set TUNEQ_API_KEY, or put the key in ~/.config/tuneq/api_key"


def key_files() -> list[Path]:
    """Where a key is looked for after $TUNEQ_API_KEY: the user's config, then `tuneq up`'s admin key."""
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return [config / "tuneq" / "api_key", Path(os.environ.get("TUNEQ_HOME") or "var") / "admin.key"]


def find_api_key() -> str | None:
    if os.environ.get("TUNEQ_API_KEY"):
        return os.environ["TUNEQ_API_KEY"].strip()
    for path in key_files():
        try:
            key = path.read_text().strip()
        except OSError:
            continue
        if key:
            return key
    return None


class TuneqError(Exception):
    """Anything a user should read as one line: an API error, an unreachable server, a bad file."""


class APIError(TuneqError):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class Client:
    def __init__(self, base_url: str | None = None, *, http: httpx.Client | None = None, timeout: float = 60,
                 api_key: str | None = None):
        self.base_url = (base_url or os.environ.get("TUNEQ_URL") or DEFAULT_URL).rstrip("/")
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
        except httpx.TransportError as exc:
            raise TuneqError(f"cannot reach tuneq at {self.base_url} ({type(exc).__name__}); is `tuneq up` running? set TUNEQ_URL") from None
        _raise_for_error(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        try:
            return r.json()
        except ValueError:
            raise TuneqError(f"{self.base_url}{path} did not answer with JSON; is TUNEQ_URL a tuneq server?") from None

    # -- resources

    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with open(path, "rb") as f:
            return self._json("POST", "/v1/files", files={"file": (path.name, f, "application/jsonl")}, data={"purpose": purpose})

    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/fine_tuning/jobs", json=body)

    def plan_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "/v1/fine_tuning/plan", json=body)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}")

    def list_jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/fine_tuning/jobs", params={"limit": limit})["data"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")

    def events(self, job_id: str, limit: int = 20) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit})["data"]

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._json("GET", f"/v1/fine_tuning/jobs/{job_id}/artifacts")["data"]

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["data"]

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
        except httpx.TransportError as exc:
            raise TuneqError(f"download of {artifact['name']} from {self.base_url} failed ({type(exc).__name__})") from None
        if artifact.get("sha256") and digest.hexdigest() != artifact["sha256"]:
            raise TuneqError(f"{artifact['name']}: sha256 mismatch after download; try again")
        return dest


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

