"""Artifact storage: one contract for the local directory and the S3 backend (on a real S3-protocol
server), the API's uploads and downloads through S3, and `core.migrate` creating the bucket."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from core.settings import Settings
from core.storage import LocalStorage, Storage, StorageKeyError, storage_for
from tests.conftest import create_user_with_key, reset_caches
from tests.s3server import bucket_keys, s3_env

GOOD_LINE = json.dumps({"messages": [{"role": "user", "content": "Reverse: abc"}, {"role": "assistant", "content": "cba"}]})


def make_storage(kind: str, tmp_path: Path, endpoint: str | None, cache: str = "cache") -> Storage:
    if kind == "local":
        return storage_for(Settings(home=tmp_path / "home", storage_url=f"file://{tmp_path / 'store'}"))
    env = s3_env(endpoint or "")
    settings = Settings(
        home=tmp_path / "home", storage_url=env["TUNEQ_STORAGE_URL"], s3_endpoint_url=endpoint or "",
        s3_access_key_id=env["TUNEQ_S3_ACCESS_KEY_ID"], s3_secret_access_key=env["TUNEQ_S3_SECRET_ACCESS_KEY"],
        storage_cache_dir=tmp_path / cache,
    )
    storage = storage_for(settings)
    assert storage.ensure_bucket()  # type: ignore[attr-defined]
    return storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    endpoint = request.getfixturevalue("s3_endpoint") if request.param == "s3" else None
    return make_storage(request.param, tmp_path, endpoint)


def test_put_read_exists_delete(storage: Storage, tmp_path: Path) -> None:
    data = b"line one\n" * 1000
    size, digest = storage.put_stream("files/file-a.jsonl", io.BytesIO(data))
    assert (size, digest) == (len(data), hashlib.sha256(data).hexdigest())
    src = tmp_path / "model.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    assert storage.put_file("jobs/ab/final/model.bin", src) == (src.stat().st_size, hashlib.sha256(src.read_bytes()).hexdigest())
    storage.put_stream("jobs/abc/final/keep.txt", io.BytesIO(b"keep"))

    assert storage.exists("files/file-a.jsonl") and not storage.exists("files/file-b.jsonl")
    assert b"".join(storage.iter_bytes("files/file-a.jsonl")) == data
    with storage.open("jobs/ab/final/model.bin") as f:
        assert f.read() == src.read_bytes()
    assert storage.local_path("jobs/ab/final/model.bin").read_bytes() == src.read_bytes()

    storage.delete_prefix("jobs/ab")  # not jobs/abc: a prefix is a folder, not a string prefix
    assert not storage.exists("jobs/ab/final/model.bin") and storage.exists("jobs/abc/final/keep.txt")
    storage.delete("files/file-a.jsonl")
    assert not storage.exists("files/file-a.jsonl")
    with pytest.raises(FileNotFoundError):
        storage.local_path("files/file-a.jsonl")


def test_adopt_stores_a_local_file_once(storage: Storage, tmp_path: Path) -> None:
    """Publishing a model: moved (keep=False) or linked (keep=True) into a local store on the same
    disk, no second copy of its bytes; uploaded to S3, the local copy removed unless kept."""
    data = bytes(range(256)) * 4096
    moved, kept = tmp_path / "final.bin", tmp_path / "ckpt.bin"
    moved.write_bytes(data)
    kept.write_bytes(data)
    inode = moved.stat().st_ino
    assert storage.adopt("jobs/j/final/model.bin", moved, keep=False)[0] == len(data)
    assert storage.adopt("jobs/j/checkpoints/step-1/model.bin", kept, keep=True)[0] == len(data)
    assert storage.adopt("jobs/j/checkpoints/step-1/model.bin", kept, keep=True)[0] == len(data)  # a re-run
    assert not moved.exists() and kept.read_bytes() == data
    for key in ("jobs/j/final/model.bin", "jobs/j/checkpoints/step-1/model.bin"):
        assert b"".join(storage.iter_bytes(key)) == data
    if isinstance(storage, LocalStorage):
        assert storage.path("jobs/j/final/model.bin").stat().st_ino == inode
        assert storage.path("jobs/j/checkpoints/step-1/model.bin").stat().st_ino == kept.stat().st_ino


def test_adopt_copies_across_disks(tmp_path: Path) -> None:
    """A store on another file system (here tmpfs; rename and link fail with EXDEV) gets a
    streamed, hashed copy, and the source goes unless kept."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to store on")
    root = Path(tempfile.mkdtemp(dir=shm, prefix="tuneq-store-"))
    try:
        storage = LocalStorage(root)
        src = tmp_path / "final.bin"
        src.write_bytes(b"weights" * 1000)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert storage.adopt("jobs/j/final/model.bin", src, keep=False) == (7000, digest)
        assert not src.exists() and storage.path("jobs/j/final/model.bin").read_bytes() == b"weights" * 1000
    finally:
        shutil.rmtree(root)


@pytest.mark.parametrize("key", ["../escape", "files/../../x", "/abs", "a//b", ""])
def test_keys_cannot_leave_the_store(storage: Storage, key: str) -> None:
    with pytest.raises(StorageKeyError):
        storage.put_stream(key, io.BytesIO(b"x"))


def test_s3_objects_live_under_the_prefix_and_another_host_downloads_them(s3_endpoint: str, tmp_path: Path) -> None:
    api_host = make_storage("s3", tmp_path, s3_endpoint, cache="api-cache")
    api_host.put_stream("files/file-x.jsonl", io.BytesIO(b"hello\n"))
    url = f"s3://{api_host.bucket}/tuneq"  # type: ignore[attr-defined]
    assert bucket_keys(s3_endpoint, url) == ["tuneq/files/file-x.jsonl"]

    # A worker on another host: same bucket, a cache of its own that starts empty.
    from core.s3_storage import S3Storage

    worker_host = S3Storage(api_host.cfg.__class__(**{**api_host.cfg.__dict__, "cache_dir": tmp_path / "gpu-host"}))  # type: ignore[attr-defined]
    local = worker_host.local_path("files/file-x.jsonl")
    assert local.is_relative_to(tmp_path / "gpu-host") and local.read_bytes() == b"hello\n"


def test_s3_multipart_upload_keeps_every_byte(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core import s3_storage

    monkeypatch.setattr(s3_storage, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    storage = s3_storage.S3Storage(make_storage("s3", tmp_path, s3_endpoint).cfg)  # type: ignore[attr-defined]
    src = tmp_path / "big.bin"
    src.write_bytes(hashlib.sha256(b"seed").digest() * (11 * 1024 * 1024 // 32))  # three parts
    size, digest = storage.put_file("jobs/j/model.tar.gz", src)
    head = storage.client.head_object(Bucket=storage.bucket, Key=storage.name("jobs/j/model.tar.gz"))
    assert "-3" in head["ETag"], "not uploaded in parts"
    assert hashlib.sha256(b"".join(storage.iter_bytes("jobs/j/model.tar.gz"))).hexdigest() == digest
    assert size == src.stat().st_size


# -- the API on S3 storage ------------------------------------------------------------------------


@pytest.fixture
def s3_client(service_env: dict[str, str], s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    from api.main import create_app
    from core.migrate import prepare_storage

    env = s3_env(s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_caches()
    prepare_storage()
    key = create_user_with_key("s3-admin", "admin")[1]
    with TestClient(create_app(), headers={"Authorization": f"Bearer {key}"}) as c:
        c.storage_url = env["TUNEQ_STORAGE_URL"]  # type: ignore[attr-defined]
        yield c


def test_api_upload_and_download_go_through_the_bucket(s3_client: TestClient, s3_endpoint: str,
                                                       service_env: dict[str, str]) -> None:
    text = (GOOD_LINE + "\n") * 3
    r = s3_client.post("/v1/files", files={"file": ("tr ain✓.jsonl", text.encode(), "application/jsonl")},
                       data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["status"] == "processed" and f["bytes"] == len(text.encode())
    assert bucket_keys(s3_endpoint, s3_client.storage_url) == [f"tuneq/files/{f['id']}.jsonl"]  # type: ignore[attr-defined]
    artifacts = Path(service_env["TUNEQ_HOME"]) / "artifacts"
    assert not artifacts.exists() or not any(p.is_file() for p in artifacts.rglob("*"))

    content = s3_client.get(f"/v1/files/{f['id']}/content")
    assert content.status_code == 200 and content.text == text
    assert content.headers["content-length"] == str(len(text.encode()))
    assert "filename*=utf-8''tr%20ain%E2%9C%93.jsonl" in content.headers["content-disposition"]


def test_api_refused_upload_leaves_nothing_in_the_bucket(s3_client: TestClient, s3_endpoint: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQ_MAX_EXAMPLES_PER_FILE", "2")
    reset_caches()
    r = s3_client.post("/v1/files", files={"file": ("t.jsonl", ((GOOD_LINE + "\n") * 3).encode())},
                       data={"purpose": "fine-tune"})
    assert r.status_code == 413, r.text
    assert bucket_keys(s3_endpoint, s3_client.storage_url) == []  # type: ignore[attr-defined]


def test_migrate_creates_the_bucket(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.migrate import main

    env = s3_env(s3_endpoint)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TUNEQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TUNEQ_DATABASE_URL", f"sqlite:///{tmp_path / 'home' / 'tuneq.db'}")
    reset_caches()
    try:
        main([])
        main([])  # a second run finds the bucket and leaves it be
        assert bucket_keys(s3_endpoint, env["TUNEQ_STORAGE_URL"]) == []
    finally:
        reset_caches()
