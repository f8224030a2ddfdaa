"""S3-compatible artifact storage (AWS S3, MinIO, Ceph RGW, ...) for API and workers on several hosts.

The trainer reads its training files as local files, so `local_path` keeps a download of a key
under a cache directory; keys are never rewritten, so a cached copy never goes stale.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from core.settings import Settings
from core.storage import CHUNK, check_key, sha256_file, write_hashed

# Below this a file goes up in one PUT; above it in parts that are retried one by one.
MULTIPART_BYTES = 64 * 1024 * 1024
MISSING = {"404", "NoSuchKey", "NotFound"}


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str
    access_key_id: str | None
    secret_access_key: str | None
    addressing_style: str
    cache_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Config:
        url = urlsplit(settings.storage_url)
        prefix = url.path.strip("/")
        return cls(
            bucket=url.netloc, prefix=f"{prefix}/" if prefix else "",
            endpoint_url=settings.s3_endpoint_url or None, region=settings.s3_region,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=settings.s3_secret_access_key.get_secret_value() or None,
            addressing_style=settings.s3_addressing_style, cache_dir=settings.resolved_storage_cache_dir(),
        )


@lru_cache(maxsize=8)
def s3_storage(cfg: S3Config) -> S3Storage:
    # One client per configuration and process: building one costs tens of milliseconds, and
    # boto3 clients are safe to share between the API's and the worker's threads.
    return S3Storage(cfg)


class S3Storage:
    def __init__(self, cfg: S3Config):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.cfg = cfg
        self.bucket = cfg.bucket
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region,
            aws_access_key_id=cfg.access_key_id, aws_secret_access_key=cfg.secret_access_key,
            config=Config(s3={"addressing_style": cfg.addressing_style}, signature_version="s3v4",
                          retries={"mode": "standard", "max_attempts": 5}),
        )
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                       max_concurrency=4)

    def name(self, key: str) -> str:
        return self.cfg.prefix + check_key(key)

    def cache_path(self, key: str) -> Path:
        root = self.cfg.cache_dir
        return root / self.cfg.bucket / self.cfg.prefix / check_key(key)

    # -- writing ------------------------------------------------------------------------------

    def put_stream(self, key: str, stream: BinaryIO) -> tuple[int, str]:
        """Spool the stream into the cache, then upload it; return (bytes, sha256).

        A request body can be read only once, but an upload may need to resend parts; the
        spooled copy is also the one `local_path` would otherwise download again (the API
        validates an upload right after storing it).
        """
        dest = self.cache_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, digest = write_hashed(stream, dest)
        try:
            self._upload(dest, key)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return size, digest

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        digest = sha256_file(src)
        self._upload(src, key)
        return src.stat().st_size, digest

    def adopt(self, key: str, src: Path, *, keep: bool) -> tuple[int, str | None]:
        """Upload a local file (multipart, from the disk); the local copy removed unless keep."""
        size = src.stat().st_size
        self._upload(src, key)
        if not keep:
            src.unlink()
        return size, None

    def _upload(self, src: Path, key: str) -> None:
        self.client.upload_file(str(src), self.bucket, self.name(key), Config=self.transfer)

    # -- reading ------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.name(key))["Body"]
        except self.client.exceptions.ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from None
            raise

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        body: Any = self.open(key)
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.name(key))
            return True
        except self.client.exceptions.ClientError as exc:
            if _missing(exc):
                return False
            raise

    def local_path(self, key: str) -> Path:
        """A local file with the key's content, downloaded once per host."""
        dest = self.cache_path(key)
        if dest.is_file():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A unique temporary name: two jobs of one host may fetch the same file at once.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self.name(key), tmp, Config=self.transfer)
            os.replace(tmp, dest)
        except self.client.exceptions.ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(f"no stored object {key!r}") from None
            raise
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dest

    # -- deleting -----------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))
        self.cache_path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        # The trailing slash keeps jobs/ab from also matching jobs/abc.
        start = self.name(prefix.rstrip("/")) + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:  # a page holds at most 1000 keys, as many as one delete_objects takes
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
        shutil.rmtree(self.cache_path(prefix.rstrip("/")), ignore_errors=True)

    # -- setup --------------------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; True if it was created."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return False
        except self.client.exceptions.ClientError as exc:
            if not _missing(exc):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.cfg.region != "us-east-1":  # the one region S3 refuses a location constraint for
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
        self.client.create_bucket(**kwargs)
        return True


def _missing(exc: Any) -> bool:
    err = exc.response.get("Error", {})
    return str(err.get("Code")) in MISSING or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404

