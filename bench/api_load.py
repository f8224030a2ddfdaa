"""Load on the API as a team puts it: pollers, live event streams, list calls and uploads at once.

    .venv/bin/python bench/api_load.py [--db sqlite|postgres|both] [--seconds 60] [--out FILE]
                                       [--source DIR]  # measure another checkout (e.g. before a change)

Starts the stack it measures on a free loopback port (`tuneq up`'s Stack, API only, SQLite file
or a fresh PostgreSQL database, the machine's Redis db 6), drives it from this process, stops it
and writes bench/results/api_load.md. Everything is bounded: each level runs a fixed time, every
request has a timeout, and the run ends by itself.

No worker runs: a writer thread here plays the worker's event pump, appending events to the jobs
at a fixed rate as a trainer's metrics would, so every stream has events to receive while the
CPU goes to the API and this load generator (both on the same machine), not to a trainer.

A poller asks for its job once a second (jittered), as a script or a dashboard does; a list
client lists jobs every 2 s; a stream follows one job's events until the job ends and is then
checked against the job's full event list (every event, in order, once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("TUNEQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("TUNEQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0] + "/6"
TIMEOUT_S = 10.0
LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse the word: lantern"},
                                {"role": "assistant", "content": "nretnal"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"


def tree_rss_kib(pid: int) -> int:
    """Resident memory of pid and its descendants (uvicorn --workers forks them)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by pid and its descendants: a measure of the API's
    work that the other load on a shared machine does not change much."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def training_file(path: Path, mib: int, salt: str = "") -> Path:
    line = (LINE + "\n").encode()
    with open(path, "wb") as f:
        if salt:  # a file of its own content, so no earlier token count applies
            f.write((json.dumps({"messages": [{"role": "user", "content": salt},
                                              {"role": "assistant", "content": salt}]}) + "\n").encode())
        for _ in range(mib * 1024 * 1024 // len(line) + 1):
            f.write(line)
    return path


class Conn:
    """One keep-alive HTTP/1.1 connection, as little client code as a request needs.

    httpx's pool costs the load generator more CPU per request than the API spends answering
    (its connection pool scans every connection per request), and on a 2-core machine the
    generator's CPU is taken from the API it measures. This sends a request and reads the
    status, the headers and a Content-Length or chunked body; nothing else."""

    def __init__(self, host: str, port: int, auth: bytes, timeout_s: float = TIMEOUT_S):
        self.host, self.port, self.auth, self.timeout_s = host, port, auth, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def _head(self, method: str, path: str) -> tuple[int, dict[bytes, bytes]]:
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n".encode() + self.auth + b"\r\n")
        assert self.reader is not None
        status_line = await self.reader.readline()
        if not status_line and reused:  # the server closed an idle keep-alive connection: as any client, reconnect
            self.close()
            return await self._head(method, path)
        if not status_line:
            raise ConnectionError("closed by the server")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        return status, headers

    async def get(self, path: str, timeout_s: float | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, headers, body); on any error the connection is dropped (the next call reconnects)."""
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                status, headers = await self._head("GET", path)
                assert self.reader is not None
                if b"content-length" in headers:
                    body = await self.reader.readexactly(int(headers[b"content-length"]))
                else:
                    body = b"".join([chunk async for chunk in self._chunks()])
            if headers.get(b"connection", b"").lower() == b"close":
                self.close()
            return status, headers, body
        except BaseException:
            self.close()
            raise

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self.reader is not None
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return
            chunk = await self.reader.readexactly(size + 2)
            yield chunk[:-2]


def upload_raw(host: str, port: int, auth: bytes, path: Path, timeout_s: float = 300) -> int:
    """POST /v1/files with `path` as a multipart form, the file's bytes sent by the kernel
    (sendfile): the upload costs this process no CPU that the API's other clients would miss."""
    boundary = secrets.token_hex(16)
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + path.stat().st_size + len(tail)
    with socket.create_connection((host, port), timeout=timeout_s) as s, open(path, "rb") as f:
        s.sendall(f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode() + auth + b"\r\n" + head)
        s.sendfile(f)
        s.sendall(tail)
        answer = b""
        while b"\r\n" not in answer:
            got = s.recv(65536)
            if not got:
                raise ConnectionError("closed by the server")
            answer += got
        return int(answer.split(b" ", 2)[1])


class Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, float, int | str]] = []  # (kind, t, ms, status or error)

    def add(self, kind: str, t0: float, status: int | str) -> None:
        self.samples.append((kind, t0, (time.monotonic() - t0) * 1000, status))

    def summary(self, kinds: tuple[str, ...], since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        rows = [s for s in self.samples if s[0] in kinds and since <= s[1] < until]
        ok = [ms for _, _, ms, st in rows if st == 200]
        shed = [ms for _, _, ms, st in rows if st in (429, 503)]
        errors = [st for _, _, _, st in rows if st not in (200, 429, 503)]
        return {"answered": len(ok), "p50": pct(ok, 50), "p99": pct(ok, 99), "max": max(ok) if ok else None,
                "shed": len(shed), "shed_p99": pct(shed, 99), "errors": len(errors),
                "error_kinds": sorted({str(e) for e in errors})[:4]}


class EventWriter(threading.Thread):
    """Plays the worker's event pump: appends an event to each job every `every_s`."""

    def __init__(self, job_ids: list[str], every_s: float):
        super().__init__(daemon=True)
        self.job_ids, self.every_s, self.stop_flag, self.written, self.failures = job_ids, every_s, threading.Event(), 0, 0

    def run(self) -> None:
        from core import states
        from core.db import session_scope
        from core.models import Job

        step = 0
        while not self.stop_flag.wait(self.every_s):
            step += 1
            try:
                with session_scope() as db:
                    for job_id in self.job_ids:
                        states.add_event(db, db.get(Job, job_id), f"step {step}", type="metrics", data={"step": step})
                self.written += len(self.job_ids)
            except Exception:  # noqa: BLE001 - a busy SQLite: the next step writes again
                self.failures += 1


async def pause(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def poller(conn: Conn, rec: Recorder, job_id: str, stop: asyncio.Event, every_s: float = 1.0) -> None:
    await pause(stop, random.random() * every_s)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status, _, _ = await conn.get(f"/v1/fine_tuning/jobs/{job_id}")
            rec.add("poll", t0, status)
        except Exception as exc:  # noqa: BLE001 - recorded as an error
            rec.add("poll", t0, type(exc).__name__)
        await pause(stop, max(0.0, every_s - (time.monotonic() - t0)) * random.uniform(0.8, 1.2))
    conn.close()


async def lister(conn: Conn, rec: Recorder, stop: asyncio.Event, every_s: float = 2.0) -> None:
    await pause(stop, random.random() * every_s)
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status, _, _ = await conn.get("/v1/fine_tuning/jobs?limit=20")
            rec.add("list", t0, status)
        except Exception as exc:  # noqa: BLE001
            rec.add("list", t0, type(exc).__name__)
        await pause(stop, every_s)
    conn.close()


async def hammer(conn: Conn, rec: Recorder, job_id: str, stop: asyncio.Event) -> None:
    """A client with no pause between requests: the overload level."""
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            status, headers, _ = await conn.get(f"/v1/fine_tuning/jobs/{job_id}")
            rec.add("hammer", t0, status)
            if status in (429, 503):
                await pause(stop, float(headers.get(b"retry-after", b"1")))
        except Exception as exc:  # noqa: BLE001
            rec.add("hammer", t0, type(exc).__name__)
    conn.close()


async def streamer(conn: Conn, job_id: str, out: dict[str, Any]) -> None:
    """Follow a job's events until `end`; out gets the ids received, or the error."""
    ids: list[str] = []
    out.update(ids=ids, ended=False, error=None)
    try:
        status, _ = await conn._head("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true&limit=100")
        if status != 200:
            out["error"] = f"HTTP {status}"
            return
        rest = b""
        async for chunk in conn._chunks():
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"id:"):
                    ids.append(line[3:].strip().decode())
                elif line.startswith(b"event: end"):
                    out["ended"] = True
                    return
    except Exception as exc:  # noqa: BLE001
        out["error"] = type(exc).__name__
    finally:
        conn.close()


async def recovery_s(conn: Conn, job_id: str, since: float, limit_s: float = 30.0) -> float | None:
    """Seconds from `since` until three GETs in a row answer 200 within 100 ms."""
    good = 0
    while time.monotonic() - since < limit_s:
        t0 = time.monotonic()
        try:
            status, _, _ = await conn.get(f"/v1/fine_tuning/jobs/{job_id}", timeout_s=5)
            fine = status == 200 and time.monotonic() - t0 < 0.1
        except Exception:  # noqa: BLE001
            fine = False
        good = good + 1 if fine else 0
        if good == 3:
            conn.close()
            return time.monotonic() - since
        await asyncio.sleep(0.05)
    conn.close()
    return None


async def load_average(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(os.getloadavg()[0])
        await pause(stop, 2.0)


def all_event_ids(http_sync: Any, job_id: str) -> list[str]:
    ids: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = http_sync.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        ids += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            return list(reversed(ids))
        after = page["data"][-1]["id"]


class Bench:
    def __init__(self, db: str, seconds: float, work: Path, log: list[str]):
        self.db, self.seconds, self.work, self.log = db, seconds, work, log
        self.rows: list[dict[str, Any]] = []
        self.extra: list[str] = []
        self.check_wait_s = 600.0

    # -- the stack

    def start(self) -> None:
        from tuneq.stack import Stack

        home = self.work / f"home-{self.db}"
        os.environ.update({
            "TUNEQ_HOME": str(home), "TUNEQ_REDIS_URL": REDIS, "TUNEQ_MAX_ACTIVE_JOBS_PER_USER": "10000",
            "TUNEQ_JOB_CREATE_RATE": "10000", "TUNEQ_MAX_GPUS_PER_USER": "64",
        })
        self.pg_name = None
        if self.db == "postgres":
            from sqlalchemy import create_engine, text

            self.pg_name = f"tuneq_bench_{secrets.token_hex(4)}"
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{self.pg_name}"'))
            admin.dispose()
            os.environ["TUNEQ_DATABASE_URL"] = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.pg_name}"
        else:
            os.environ["TUNEQ_DATABASE_URL"] = f"sqlite:///{home / 'tuneq.db'}"
        import redis

        redis.Redis.from_url(REDIS).flushdb()
        self.stack = Stack(home, port=free_port(), worker=False, log=lambda m: None)
        # The tiny model is built once per machine (a minute of CPU on a busy one), then copied.
        tiny, cache = home / "models" / "tiny-llama", Path(tempfile.gettempdir()) / "tuneq-bench-tiny-llama"
        if (cache / "config.json").is_file() and not tiny.exists():
            shutil.copytree(cache, tiny)
        self.stack.prepare()
        if not (cache / "config.json").is_file():
            shutil.copytree(tiny, cache, dirs_exist_ok=True)
        self.stack.start()
        self.api_pid = self.stack.children[0][1].pid
        self.url = self.stack.url
        self.key = self.stack.admin_key_path.read_text().strip()
        self.auth = f"Authorization: Bearer {self.key}\r\n".encode()
        from tests.conftest import reset_caches

        reset_caches()  # this process writes events into the stack's database

    def stop(self) -> None:
        self.stack.stop()
        if self.pg_name:
            from sqlalchemy import create_engine, text

            from tests.conftest import reset_caches

            reset_caches()
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'))
            admin.dispose()

    def client(self, asynchronous: bool = True, **kw: Any) -> Any:
        import httpx

        cls = httpx.AsyncClient if asynchronous else httpx.Client
        kw.setdefault("timeout", TIMEOUT_S)
        return cls(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"},
                   limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000), **kw)

    def conn(self) -> Conn:
        host, port = self.url.split("//", 1)[1].rsplit(":", 1)
        return Conn(host, int(port), self.auth)

    def make_jobs(self, n: int) -> list[str]:
        path = training_file(self.work / "small.jsonl", 0)
        with self.client(False, timeout=120) as http:  # the first creation loads the tokenizer
            with open(path, "rb") as f:
                file_id = http.post("/v1/files", files={"file": ("small.jsonl", f)}, data={"purpose": "fine-tune"}).json()["id"]
            ids = []
            for _ in range(n):
                r = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                            "hyperparameters": {"n_epochs": 1}})
                assert r.status_code == 200, r.text
                ids.append(r.json()["id"])
        return ids

    # -- the levels

    async def level(self, name: str, job_ids: list[str], pollers: int, streams: int = 0, listers: int = 0,
                    seconds: float = 20, upload_mib: int = 0, hammers: int = 0) -> None:
        rec = Recorder()
        stop = asyncio.Event()
        writer = EventWriter(job_ids, 0.25) if streams else None
        outs: list[dict[str, Any]] = [{} for _ in range(streams)]
        conn = self.conn
        tasks = [asyncio.create_task(poller(conn(), rec, job_ids[i % len(job_ids)], stop)) for i in range(pollers)]
        tasks += [asyncio.create_task(lister(conn(), rec, stop)) for _ in range(listers)]
        tasks += [asyncio.create_task(hammer(conn(), rec, job_ids[i % len(job_ids)], stop)) for i in range(hammers)]
        stream_tasks = [asyncio.create_task(streamer(conn(), job_ids[i % len(job_ids)], outs[i])) for i in range(streams)]
        loads: list[float] = []
        tasks.append(asyncio.create_task(load_average(loads, stop)))
        if writer:
            writer.start()
        t_start, cpu_start, gen_start = time.monotonic(), tree_cpu_s(self.api_pid), time.process_time()
        upload_ms = None
        if upload_mib:
            await asyncio.sleep(2)
            path = training_file(self.work / f"up{upload_mib}.jsonl", upload_mib)
            t0 = time.monotonic()
            host, port = self.url.split("//", 1)[1].rsplit(":", 1)
            try:
                status: int | str = await asyncio.to_thread(upload_raw, host, int(port), self.auth, path)
            except Exception as exc:  # noqa: BLE001 - the row says so
                status = type(exc).__name__
            upload_ms = (time.monotonic() - t0) * 1000
            up_window = (t0, time.monotonic())
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - t_start)))
        stop.set()
        t_end, cpu_used, gen_used = time.monotonic(), tree_cpu_s(self.api_pid) - cpu_start, time.process_time() - gen_start
        # A fresh connection, as a new client would open, while the load's last requests finish.
        recovery = asyncio.create_task(recovery_s(conn(), job_ids[0], t_end))
        await asyncio.gather(*tasks)
        rec_s = await recovery
        if writer:
            writer.stop_flag.set()
            writer.join()
            with self.client(False, timeout=60) as h:  # ends the jobs: every stream must then get `end`
                for job_id in job_ids:
                    try:
                        h.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
                    except Exception as exc:  # noqa: BLE001 - an API that fell over; the row says so
                        self.log.append(f"[{self.db}] cancel of {job_id} failed: {type(exc).__name__}")
            done, _ = await asyncio.wait(stream_tasks, timeout=30)
            for t in stream_tasks:
                t.cancel()
        row: dict[str, Any] = {"level": name, **rec.summary(("poll", "list", "hammer")), "recovery_s": rec_s,
                               "api_cpu": cpu_used / (t_end - t_start), "gen_cpu": gen_used / (t_end - t_start),
                               "api_cpu_s": cpu_used,
                               "load": (min(loads), max(loads))}
        # Polls and lists apart: a tail can be one kind's alone.
        row["by_kind"] = {k: {"answered": v["answered"], "p50": v["p50"], "p99": v["p99"], "max": v["max"]}
                          for k in ("poll", "list") if (v := rec.summary((k,)))["answered"]}
        if streams:
            with self.client(False, timeout=60) as h:
                truth = {}
                for j in job_ids:
                    try:
                        truth[j] = all_event_ids(h, j)
                    except Exception:  # noqa: BLE001 - no truth to compare with: those streams count as failed
                        truth[j] = None
            bad = []
            for i, o in enumerate(outs):
                want = truth[job_ids[i % len(job_ids)]]
                if not (o.get("ended") and want is not None and o["ids"] == want):
                    bad.append(o.get("error") or ("no end" if not o.get("ended") else "mismatch"))
            row["streams"] = f"{streams - len(bad)}/{streams} complete and in order"
            if bad:
                row["streams"] += f" ({', '.join(sorted(set(map(str, bad))))})"
            row["events"] = f"{writer.written} written" + (f", {writer.failures} write failures" if writer.failures else "")
        if upload_mib:
            during = rec.summary(("poll", "list"), *up_window)
            row["upload"] = (f"{upload_mib} MiB upload: HTTP {status} in {upload_ms / 1000:.1f} s; others meanwhile: "
                             f"{during['answered']} answered, p99 {fmt_ms(during['p99'])}, {during['errors']} errors")
        self.rows.append(row)
        self.log.append(f"[{self.db}] {name}: {json.dumps(row, default=str)}")
        print(self.log[-1], flush=True)

    def creation_latency(self, sizes: tuple[int, ...], reps: int) -> None:
        """POST /v1/fine_tuning/jobs timed, each with a training file of its own (never counted
        before: the worst case); the first job of each size is followed until its check ends."""
        with self.client(False, timeout=300) as http:
            for mib in sizes:
                times, statuses, ready = [], [], ""
                for rep in range(reps):
                    path = training_file(self.work / f"train{mib}-{rep}.jsonl", mib, salt=f"{time.time_ns()}")
                    try:
                        with open(path, "rb") as f:
                            file_id = http.post("/v1/files", files={"file": (path.name, f)}, timeout=900,
                                                data={"purpose": "fine-tune"}).json()["id"]
                    except Exception as exc:  # noqa: BLE001 - the row says so
                        statuses.append(f"upload {type(exc).__name__}")
                        continue
                    finally:
                        path.unlink()
                    t0 = time.monotonic()
                    r = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                                 "hyperparameters": {"n_epochs": 1}})
                    times.append((time.monotonic() - t0) * 1000)
                    statuses.append(r.status_code)
                    if r.status_code == 200 and rep == 0:
                        job = r.json()
                        first = job["status"]
                        while job["status"] == "validating_files" and time.monotonic() - t0 < self.check_wait_s:
                            time.sleep(0.5)
                            job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                        ready = f"first answered `{first}`, then `{job['status']}` after {time.monotonic() - t0:.1f} s"
                line = (f"[{self.db}] create job, {mib} MiB training file: p50 {fmt_ms(pct(times, 50))}, "
                        f"max {fmt_ms(max(times) if times else None)} over {len(times)} creations; "
                        f"answers {sorted(set(map(str, statuses)))}; {ready}")
                self.extra.append(line)
                print(line, flush=True)

    def unauthenticated_body(self, mib: int = 50) -> None:
        import httpx

        body = b"[" + b"{},"* (mib * 1024 * 1024 // 3) + b"{}]"
        before = tree_rss_kib(self.api_pid)
        peak = [before]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], tree_rss_kib(self.api_pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            r = httpx.post(f"{self.url}/v1/fine_tuning/jobs", content=body,
                           headers={"Content-Type": "application/json"}, timeout=60)
            status: int | str = r.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        ms = (time.monotonic() - t0) * 1000
        time.sleep(0.5)
        done.set()
        sampler.join()
        line = (f"[{self.db}] unauthenticated {mib} MiB JSON body to POST /v1/fine_tuning/jobs: {status} in {fmt_ms(ms)}; "
                f"API memory {before / 1024:.0f} MiB before, peak +{(peak[0] - before) / 1024:.1f} MiB")
        self.extra.append(line)
        print(line, flush=True)

    def stalled_headers(self, n: int = 90, wait_s: float = 15.0) -> None:
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])))
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        time.sleep(wait_s)
        closed = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except (TimeoutError, BlockingIOError):
                pass
            s.close()
        line = f"[{self.db}] {n} connections stalled mid-header: {closed} closed by the server within {wait_s:.0f} s"
        self.extra.append(line)
        print(line, flush=True)

    async def run_levels(self, which: set[int]) -> None:
        jobs = self.make_jobs(10)
        s = self.seconds
        if 1 in which:
            await self.level("10 pollers", jobs, 10, seconds=min(s, 20))
        if 2 in which:
            await self.level("100 pollers", jobs, 100, seconds=min(s, 30))
        if 3 in which:
            await self.level("100 pollers + 50 streams + 10 list clients", jobs[:5], 100, streams=50, listers=10, seconds=s)
        if 4 in which:
            await self.level("same + one 50 MiB upload", self.make_jobs(5), 100, streams=50, listers=10,
                             seconds=min(s, 30), upload_mib=50)
        if 5 in which:
            await self.level("overload: 300 clients without pause", jobs, 0, hammers=300, seconds=min(s, 15))


def write_report(path: Path, benches: list[Bench], args: argparse.Namespace, log: list[str]) -> None:
    host = f"{os.cpu_count()} CPUs; load average at the end {os.getloadavg()[0]:.1f}"
    out = [
        "# API under load (bench/api_load.py)", "",
        f"`{' '.join(sys.argv)}` — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {host}.",
        "The machine is shared with other busy sessions: numbers vary from run to run (the load",
        "average during each level is in its row); the load generator runs on the same cores as the",
        "API, one asyncio process with a keep-alive connection per client and no HTTP library.", "",
        "Pollers: GET a job once a second each. List clients: GET /v1/fine_tuning/jobs every 2 s.",
        "Streams: SSE until the job ends, checked against the job's full event list. Shed: 429/503",
        "answers (with Retry-After). Recovery: from the end of the load until three GETs in a row",
        "answer within 100 ms. API CPU: cores the API process used on average during the level (the",
        "work it did, which other load on the machine changes less than it changes latency); bench",
        "CPU: the same for the load generator. API CPU per request: the API's CPU seconds during the",
        "level over the requests answered or shed (streams' events are work it does besides). Load:",
        "the machine's 1-minute load average during the level (2 cores: above 2, processes wait for a CPU).", "",
    ]
    for b in benches:
        out += [f"## {b.db}", "", "| load | answered | p50 | p99 | max | shed | errors | recovery | API CPU | API CPU per request | bench CPU | load | streams |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in b.rows:
            errs = f"{r['errors']}" + (f" ({', '.join(r['error_kinds'])})" if r["errors"] else "")
            rec = "—" if r["recovery_s"] is None else f"{r['recovery_s']:.2f} s"
            requests = r["answered"] + r["shed"] + r["errors"]
            per_request = f"{1000 * r['api_cpu_s'] / requests:.2f} ms" if requests else "—"
            out.append(f"| {r['level']} | {r['answered']} | {fmt_ms(r['p50'])} | {fmt_ms(r['p99'])} | "
                       f"{fmt_ms(r['max'])} | {r['shed']} | {errs} | {rec} | {r['api_cpu']:.2f} cores | {per_request} | "
                       f"{r['gen_cpu']:.2f} cores | {r['load'][0]:.1f}–{r['load'][1]:.1f} | {r.get('streams', '')} |")
        out.append("")
        out += [f"- {r['upload']}" for r in b.rows if "upload" in r]
        out += [f"- {line.split('] ', 1)[1]}" for line in b.extra]
        out += [f"- events written by the stand-in pump: {r['events']} ({r['level']})" for r in b.rows if "events" in r]
        out.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n")


def run(coro: Any) -> Any:
    try:
        import uvloop  # the API's own loop (uvicorn picks it): the generator's per-request cost halves
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--reps", type=int, default=3, help="job creations per training file size")
    ap.add_argument("--sizes", default="1,10,50", help="training file sizes in MiB for the creation latency")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api_load.md")
    ap.add_argument("--check-wait", type=float, default=600, help="seconds to follow the first job of a size to queued")
    ap.add_argument("--levels", default="1,2,3,4,5", help="which load levels to run (1-5)")
    ap.add_argument("--extras", default="create,unauth,stalled", help="which one-off checks to run")
    ap.add_argument("--source", type=Path, default=ROOT, help="the checkout whose API is measured")
    args = ap.parse_args()
    sys.path.insert(0, str(args.source.resolve()))
    if args.source.resolve() != ROOT:
        sys.path.insert(1, str(ROOT))
    # The stack's children run `python -m ...`, which puts the current directory first on their
    # path: run from another checkout, they would import its api/ instead of the one measured.
    os.chdir(args.source.resolve())
    log: list[str] = []
    benches = []
    with tempfile.TemporaryDirectory(prefix="tuneq-api-load-") as tmp:
        for db in (("sqlite", "postgres") if args.db == "both" else (args.db,)):
            b = Bench(db, args.seconds, Path(tmp), log)
            b.check_wait_s = args.check_wait
            benches.append(b)
            b.start()
            try:
                run(b.run_levels({int(x) for x in args.levels.split(",") if x}))
                extras = set(args.extras.split(","))
                if "create" in extras:
                    b.creation_latency(tuple(int(x) for x in args.sizes.split(",")), args.reps)
                if "unauth" in extras:
                    b.unauthenticated_body()
                if "stalled" in extras:
                    b.stalled_headers()
            finally:
                b.stop()
                write_report(args.out, benches, args, log)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
