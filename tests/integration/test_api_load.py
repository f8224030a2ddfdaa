"""The API under load, served by uvicorn as in production: streams hold no database connection,
bodies are capped and authenticated before they are read, stalled requests are closed, overload
is refused at once."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from tests.conftest import create_user_with_key
from tests.integration.conftest import ROOT, make_job, wait_for
from core.ports import free_port

pytestmark = pytest.mark.timeout(240)


class Api:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, key: str, log: Path):
        self.proc, self.port, self.key, self.log = proc, port, key, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, **{"timeout": 30, **kw})

    def raw(self, request: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.sendall(request)
        return s


@pytest.fixture
def serve(db_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Api]]:
    """Start the API (uvicorn with the project's protocol) with extra TUNEQ_* settings."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**settings: Any) -> Api:
        _, key = create_user_with_key(f"admin{len(started)}", "admin")
        env = {**os.environ, **db_env, **{f"TUNEQ_{k.upper()}": str(v) for k, v in settings.items()},
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))}
        port, log = free_port(), tmp_path / f"api{len(started)}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
             "--http", "api.server:GuardedHttpToolsProtocol"],
            cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        )
        started.append(proc)
        api = Api(proc, port, key, log)

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"{api.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 180, "the API")
        return api

    yield start
    for p in started:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def add_events(job_id: str, n: int, then_cancel: bool = True) -> None:
    from core import states
    from core.db import session_scope
    from core.jobs import request_cancel
    from core.models import Job

    for i in range(n):
        with session_scope() as db:
            states.add_event(db, db.get(Job, job_id), f"live {i}", type="metrics", data={"i": i})
    if then_cancel:
        with session_scope() as db:
            request_cancel(db, db.get(Job, job_id))


def test_thirty_streams_with_a_pool_of_five_still_serve_gets(serve, db: Session) -> None:  # noqa: ANN001
    # No overflow and a short pool timeout: a stream that held a connection would starve the rest.
    api = serve(db_pool_size=5, db_max_overflow=0, db_pool_timeout_s=2)
    job_id = make_job(db).id
    streams = 30
    got: list[list[str]] = [[] for _ in range(streams)]
    ended = [False] * streams
    first = [threading.Event() for _ in range(streams)]
    errors: list[str] = []

    def follow(i: int) -> None:
        try:
            with api.client(timeout=60) as c, c.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                                                      params={"stream": "true"}) as r:
                if r.status_code != 200:
                    errors.append(f"stream {i}: HTTP {r.status_code}")
                    return
                for line in r.iter_lines():
                    if line.startswith("id:"):
                        got[i].append(line[3:].strip())
                        first[i].set()
                    elif line.startswith("event: end"):
                        ended[i] = True
                        return
        except httpx.HTTPError as exc:
            errors.append(f"stream {i}: {type(exc).__name__}")
        finally:
            first[i].set()

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for e in first:
        assert e.wait(60)
    assert not errors, errors
    # Every stream is open and waiting; the pool must still serve requests promptly.
    with api.client() as c:
        for _ in range(20):
            t0 = time.monotonic()
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}")
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 2.0
    add_events(job_id, 5)
    for t in threads:
        t.join(60)
    assert not errors, errors
    with api.client() as c:
        page = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    every = [e["id"] for e in reversed(page)]
    assert all(ended), "every stream ends with the job"
    assert all(g == every for g in got), "every stream got every event, in order, once"


def read_response(s: socket.socket) -> tuple[int, bytes]:
    """(status, head and body) of one response read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := s.recv(65536)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length and (chunk := s.recv(65536)):
        body += chunk
    return int(head.split(b"\r\n", 1)[0].split()[1]), head + b"\r\n\r\n" + body


def test_bodies_are_authenticated_and_capped_before_they_are_read(serve) -> None:  # noqa: ANN001
    api = serve(max_json_body_bytes=64 * 1024, max_upload_bytes=1024 * 1024)
    big = 50 * 1024 * 1024
    # Headers announce 50 MB, only 1 KB follows: an answer now proves the rest was never waited for.
    anonymous = api.raw(b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % big + b"[" * 1024)
    status, data = read_response(anonymous)
    assert status == 401 and b"missing_api_key" in data
    auth = f"Authorization: Bearer {api.key}\r\n".encode()
    for path, code in ((b"/v1/fine_tuning/jobs", b"body_too_large"), (b"/v1/files", b"file_too_large")):
        s = api.raw(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n" % big + b"{" * 1024)
        status, data = read_response(s)
        assert status == 413 and code in data, data
    # A body without a declared length is cut off as soon as it passes the cap.
    with api.client() as c:
        r = c.post("/v1/fine_tuning/jobs", content=iter([b" " * 16384] * 8 + [b"{}"]),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        r = c.post("/v1/fine_tuning/jobs", content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text  # under the cap: parsed, and refused for what it lacks


def test_stalled_requests_are_closed(serve) -> None:  # noqa: ANN001
    api = serve(api_header_timeout_s=1, api_body_timeout_s=1)
    stalled_header = api.raw(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    stalled_body = api.raw(b"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\n"
                           + f"Authorization: Bearer {api.key}\r\n".encode()
                           + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    idle = api.raw(b"")  # never sends a byte
    for s in (stalled_header, stalled_body, idle):
        s.settimeout(5)
        t0 = time.monotonic()
        try:
            while s.recv(65536):
                pass  # a 4xx is fine too; what matters is that the server closes
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 4.5
    # A prompt client is unaffected.
    with api.client() as c:
        assert c.get("/v1/models").status_code == 200


def test_overload_is_refused_at_once_with_retry_after(serve, db: Session) -> None:  # noqa: ANN001
    api = serve(api_max_inflight=2)
    job_id = make_job(db).id

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=30,
                                     limits=httpx.Limits(max_connections=200)) as c:
            return await asyncio.gather(*(c.get(f"/v1/fine_tuning/jobs/{job_id}") for _ in range(100)))

    answers = asyncio.run(burst())
    shed = [r for r in answers if r.status_code == 503]
    assert shed and all(r.status_code in (200, 503) for r in answers)
    assert shed[0].headers["retry-after"] == "1" and shed[0].json()["error"]["code"] == "server_busy"
    with api.client() as c:  # the burst is over: back to normal at once
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200
        assert c.get("/healthz").status_code == 200


def test_a_polled_read_is_one_thread_hop(db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """GET a job and the job list: the key check, the queries and the JSON run on one worker
    thread, not one thread hop per sync dependency (each a wait for a thread and for the
    interpreter lock on a busy machine)."""
    import anyio.to_thread
    from fastapi.testclient import TestClient

    from api.main import create_app

    job_id = make_job(db).id
    _, key = create_user_with_key("poller", "admin")
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kw: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kw)

    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        for path in (f"/v1/fine_tuning/jobs/{job_id}", "/v1/fine_tuning/jobs"):
            hops.clear()
            r = c.get(path)
            assert r.status_code == 200, r.text
            assert len(hops) == 1, f"{path}: {hops}"
        hops.clear()
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}", headers={"Authorization": "Bearer tq_nope"}).status_code == 401


def test_opening_a_stream_is_one_thread_hop_on_threads_of_its_own(db: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening an event stream reads like a poll, in one hop, and on threads apart from the shared
    pool: a burst of opens (a dashboard's page of streams, reconnects after a restart) must not
    take the threads, and the interpreter lock, that polls need. Each open was two hops (the key,
    then the route) on the shared pool, and polls waited behind the whole burst."""
    import anyio.to_thread
    from fastapi.testclient import TestClient

    from api.main import create_app
    from api.routes import events

    job_id = make_job(db).id
    _, key = create_user_with_key("watcher", "admin")
    hops: list[tuple[str, Any]] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kw: Any) -> Any:
        hops.append((getattr(func, "__name__", repr(func)), kw.get("limiter")))
        return await real(func, *args, **kw)

    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        with c.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as r:
            assert r.status_code == 200
            opening = [h for h in hops if h[0] != "_read"]  # the hub's reads are not the open's
            assert len(opening) == 1, hops
            assert opening[0][1] is events.OPENING
        hops.clear()
        r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events")  # a page: one hop on the shared pool
        assert r.status_code == 200 and [h[1] for h in hops] == [None], hops
