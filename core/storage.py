"""Artifact storage. Keys are relative names chosen by tuneq, never by users.

Two backends with one interface: a local directory (one host) and an S3-compatible bucket
(several hosts), chosen by `TUNEQ_STORAGE_URL`. Keys are never rewritten once stored (file and
job ids are unique), which is what lets the S3 backend cache local copies without checking them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlsplit

from core.settings import Settings, get_settings

CHUNK = 1024 * 1024
# Why a link or a rename into the store falls back to a copy: another disk, or a file system
# without hard links.
NOT_LINKABLE = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP}


class StorageKeyError(ValueError):
    pass


class Storage(Protocol):
    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]: ...
    def put_file(self, key: str, src: Path) -> tuple[int, str]: ...
    def adopt(self, key: str, src: Path, *, keep: bool) -> tuple[int, str | None]: ...
    def open(self, key: str) -> BinaryIO: ...
    def iter_bytes(self, key: str) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def local_path(self, key: str) -> Path: ...


def check_key(key: str) -> str:
    # Keys become paths on disk (local store, S3 cache): nothing may climb out of the root.
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in key:
        raise StorageKeyError(f"bad storage key: {key!r}")
    return key


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / check_key(key)).resolve()
        if self.root not in p.parents:
            raise StorageKeyError(f"storage key escapes the store: {key!r}")
        return p

    def local_path(self, key: str) -> Path:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"no stored file {key!r}")
        return path

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Copy a stream into the store; return (bytes, sha256)."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        size, digest = write_hashed(stream, dest)
        return size, digest

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        with open(src, "rb") as f:
            return self.put_stream(key, f)

    def adopt(self, key: str, src: Path, *, keep: bool) -> tuple[int, str | None]:
        """Store a local file without writing its bytes again where the store shares its disk: a
        hard link when the source stays (keep), else a rename. Elsewhere a streamed copy, the
        source removed unless keep. Returns (bytes, sha256 of a copy, or None: nothing was read).

        A link is safe because nothing rewrites a published file in place: the trainer writes a
        checkpoint in a temporary folder and renames it.
        """
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        try:
            if keep:
                tmp = dest.with_name(dest.name + ".link")
                tmp.unlink(missing_ok=True)
                os.link(src, tmp)
                tmp.replace(dest)
            else:
                os.replace(src, dest)
            return size, None
        except OSError as exc:
            if exc.errno not in NOT_LINKABLE:
                raise
        with open(src, "rb") as f:
            size, digest = write_hashed(f, dest)
        if not keep:
            src.unlink()
        return size, digest

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


def write_hashed(stream: BinaryIO, dest: Path) -> tuple[int, str]:
    """Write stream to dest through a temporary name, so a reader never sees half a file.

    The temporary name is the writer's own: two writers of one key at once (two API requests
    storing the same token report) would otherwise share it, and the second rename would find it
    gone. The last rename wins, and each rename puts a whole file in place."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}-{secrets.token_hex(6)}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        # 0600 whatever the process umask: stored files are tenants' data.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a broken upload leaves no half file behind
        raise
    tmp.replace(dest)
    return size, digest.hexdigest()


def get_storage() -> Storage:
    return storage_for(get_settings())


def storage_for(settings: Settings) -> Storage:
    url = settings.storage_url
    if url.startswith("s3://"):
        from core.s3_storage import S3Config, s3_storage

        return s3_storage(S3Config.from_settings(settings))
    if url.startswith("file://"):
        return LocalStorage(Path(unquote(urlsplit(url).path)))
    return LocalStorage(settings.resolved_artifact_dir())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
