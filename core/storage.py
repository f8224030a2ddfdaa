"""Artifact storage. Keys are relative names chosen by tuneq, never by users."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.settings import get_settings

CHUNK = 1024 * 1024


class StorageKeyError(ValueError):
    pass


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root not in p.parents:
            raise StorageKeyError(f"storage key escapes the store: {key!r}")
        return p

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Copy a stream into the store; return (bytes, sha256)."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        size = 0
        with open(tmp, "wb") as out:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        tmp.replace(dest)
        return size, digest.hexdigest()

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        with open(src, "rb") as f:
            return self.put_stream(key, f)

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        with self.open(key) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


def get_storage() -> LocalStorage:
    return LocalStorage(get_settings().resolved_artifact_dir())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
