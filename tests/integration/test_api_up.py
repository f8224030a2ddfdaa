"""`tuneq up` as a user runs it: the stack comes up on an empty home, trains, chats, and Ctrl-C stops all of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from core.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; the supervisor is its parent and has exited.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_up_runs_a_job_and_stops_on_ctrl_c(tmp_path: Path, tiny_model_dir: Path) -> None:
    home = tmp_path / "var"
    # A copy, so the build step is skipped (the trainer's own tests cover `python -m trainer tiny`).
    shutil.copytree(tiny_model_dir, home / "models" / "tiny-llama")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}  # all defaults, embedded Redis
    # but no standby trainers (the trainer template, on by default, takes this job) and a checking
    # child started on demand: what they cost and how the readiness waits for them have tests of
    # their own (test_worker_standby, test_api_warmup).
    env.update(PYTHONPATH=str(ROOT), TUNEQ_STANDBY_TRAINERS="0", TUNEQ_API_WARM_CHILD="false")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneq", "up", "--home", str(home), "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "tuneq is ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        text = log.read_text()
        # It says ready once the API, and the worker's trainer template, finished their warm-ups.
        assert text.index("tuneq is up") < text.index("tuneq is ready")
        assert re.search(r"tuneq is ready: \d+\.\d s after start", text), text
        ready = httpx.get(f"{url}/readyz?workers=1", timeout=30).json()
        assert ready["status"] == "ready" and ready["workers"] == ready["workers_ready"] == 1, ready
        assert ready["templates_importing"] == 0 and ready["standbys_wanted"] == 0, ready
        pids = [int(p) for p in re.findall(r"(?:api|worker|serve): pid (\d+)", text)]
        redis_port = int(re.search(r"redis: embedded at redis://:\*\*\*@127.0.0.1:(\d+)/0", text).group(1))
        assert len(pids) == 3 and _listening(redis_port)
        assert (home / "tuneq.db").is_file()
        # The first admin key: printed once, and kept in admin.key for its owner only.
        key_file = home / "admin.key"
        key = key_file.read_text().strip()
        assert key.startswith("tq_") and text.count(key) == 1
        assert key_file.stat().st_mode & 0o777 == 0o600

        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            assert c.get("/v1/models").status_code == 401
            c.headers["Authorization"] = f"Bearer {key}"
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny-llama"]
            f = c.post("/v1/files", files={"file": ("t.jsonl", (LINE + "\n") * 8)}, data={"purpose": "fine-tune"}).json()
            job = c.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": f["id"], "method": "lora",
                "hyperparameters": {"max_steps": 2, "batch_size": 2},
            }).json()
            deadline = time.monotonic() + 180
            while (status := c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]) not in ("succeeded", "failed"):
                assert time.monotonic() < deadline, (status, log.read_text())
                time.sleep(0.5)
            assert status == "succeeded", (home / "logs" / "worker.log").read_text()[-3000:]
            assert any(a["name"] == "adapter.tar.gz" for a in c.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"])
            # The inference server beside the worker answers as the fine-tuned model (once registered).
            model = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["fine_tuned_model"]
            ask = {"model": model, "messages": [{"role": "user", "content": "Reverse: abc"}], "max_tokens": 4, "temperature": 0}
            deadline = time.monotonic() + 120
            while (r := c.post("/v1/chat/completions", json=ask)).status_code == 503:
                assert time.monotonic() < deadline, (r.text, (home / "logs" / "serve.log").read_text()[-3000:])
                time.sleep(1)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(90) == 0, log.read_text()
        assert not [p for p in pids if _alive(p)], log.read_text()
        assert not _listening(redis_port) and not _listening(port)
        assert all(f"{name}: stopped" in log.read_text() for name in ("serve", "worker", "redis"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}, "PYTHONPATH": str(ROOT)}
        r = subprocess.run([sys.executable, "-m", "tuneq", "up", "--home", str(tmp_path / "var"), "--port", str(port)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; stop what runs there or pass --port"
