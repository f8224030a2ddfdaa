"""A real S3-protocol server for tests: moto's standalone server as a subprocess on a free port."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ACCESS_KEY = "tuneq-test"
SECRET_KEY = "tuneq-test-secret"


@contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    from core.ports import free_port

    port = free_port()
    # As a module of this interpreter: the lent GPU's bundle (bench/device_svc.sh) has no scripts.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited:\n{log_path.read_text()[-3000:]}")
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server not up after 60 s:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def s3_env(endpoint: str, prefix: str = "tuneq") -> dict[str, str]:
    """TUNEQ_* settings for S3 storage in a bucket of its own (created by `core.migrate`)."""
    bucket = f"tuneq-{secrets.token_hex(4)}"
    return {
        "TUNEQ_STORAGE_URL": f"s3://{bucket}/{prefix}",
        "TUNEQ_S3_ENDPOINT_URL": endpoint,
        "TUNEQ_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "TUNEQ_S3_SECRET_ACCESS_KEY": SECRET_KEY,
    }


def bucket_keys(endpoint: str, storage_url: str) -> list[str]:
    """Every object name in the bucket of storage_url, read with a client of the test's own."""
    import boto3

    bucket = storage_url.removeprefix("s3://").split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        names.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(names)
