"""`tuneq up` on a shared machine: var/ is its owner's alone, and the embedded Redis wants a password.

The stack runs as a user runs it (a process of its own, all defaults, embedded Redis); after an
upload and a failing request, every folder under home is 0700 and every file 0600.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from core.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


def loose_modes(home: Path) -> list[str]:
    loose = []
    for path in (home, *home.rglob("*")):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(home)} {oct(mode)}")
    return loose


def test_home_is_private_and_redis_needs_its_password(tmp_path: Path, tiny_model_dir: Path) -> None:
    home = tmp_path / "var"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny-llama")
    old = home / "logs" / "api.log"  # left world-readable by an older version
    old.parent.mkdir(parents=True)
    old.write_text("old\n")
    old.chmod(0o644)
    home.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
    # No warm-ups this test has no use for (standby trainers, the warm checking child, the trainer
    # template, which `tuneq up` starts with its worker by default): their imports. It runs no job.
    env.update(PYTHONPATH=str(ROOT), TUNEQ_STANDBY_TRAINERS="0", TUNEQ_API_WARM_CHILD="false",
               TUNEQ_TRAINER_TEMPLATE_AT_START="false")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneq", "up", "--home", str(home), "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "tuneq is up" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        key = (home / "admin.key").read_text().strip()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            f = c.post("/v1/files", files={"file": ("t.jsonl", (LINE + "\n") * 4)}, data={"purpose": "fine-tune"})
            assert f.status_code == 200, f.text
        assert loose_modes(home) == []
        assert (home / "tuneq.db").is_file() and list((home / "artifacts" / "files").iterdir())

        text = log.read_text()
        assert "redis: embedded at redis://:***@127.0.0.1:" in text
        redis_port = int(re.search(r"redis: embedded at redis://:\*\*\*@127\.0\.0\.1:(\d+)/0", text).group(1))
        password = (home / "redis" / "password").read_text().strip()
        assert len(password) >= 32 and password not in text
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=redis_port).ping()
        client = redis.Redis(port=redis_port, password=password)
        assert client.ping()
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.config_get("dir")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_stored_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """An API run without `tuneq up` (systemd, a container) still stores uploads 0600."""
    import io

    from core.storage import LocalStorage

    store = LocalStorage(tmp_path / "store")
    previous = os.umask(0o022)
    try:
        store.put_stream("files/a.jsonl", io.BytesIO(b"{}\n"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(store.path("files/a.jsonl").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.path("files/a.jsonl").parent.stat().st_mode) == 0o700

    class Broken(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        store.put_stream("files/b.jsonl", Broken())
    assert sorted(p.name for p in (tmp_path / "store" / "files").iterdir()) == ["a.jsonl"]
