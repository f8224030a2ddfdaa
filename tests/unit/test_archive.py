"""core.archive: the .tar.gz and .tar the API streams from stored files read back as archives,
with the length and sha256 the listing promised."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from core.archive import STORED_MAX, Index, Member, digest

FILES = {
    "k/weights": os.urandom(3 * STORED_MAX + 17),  # crosses stored-block boundaries
    "k/exact": os.urandom(STORED_MAX - 512 - 1024),  # with its header and the end, near one block
    "k/config.json": b"{}",
    "k/empty": b"",
    "k/deep": b"x" * 700,
}
NAMES = {"k/weights": "m/model.safetensors", "k/exact": "m/exact.bin", "k/config.json": "m/config.json",
         "k/empty": "m/empty", "k/deep": "m/" + "sub/" * 30 + "long-name.json"}  # a path past ustar's 100 chars


def read(key: str) -> list[bytes]:
    data = FILES[key]
    return [data[i:i + 5000] for i in range(0, len(data), 5000)] or [b""]


def index(gz: bool) -> Index:
    members = [Member("m/", mtime=1_700_000_000)]
    members += [Member(NAMES[k], k, len(v), 1_700_000_000) for k, v in FILES.items()]
    return Index(members, gz)


@pytest.mark.parametrize("gz", [True, False])
def test_streamed_archive_reads_back_with_its_promised_length_and_sha(gz: bool) -> None:
    ix = Index.from_json(index(gz).to_json())
    body = b"".join(ix.stream(read))
    assert len(body) == ix.size()
    assert hashlib.sha256(body).hexdigest() == digest(ix, read)
    if gz:
        assert len(gzip.decompress(body)) == ix.tar_bytes()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz" if gz else "r:") as tar:
        for key, name in NAMES.items():
            assert tar.extractfile(name).read() == FILES[key]
            assert tar.getmember(name).mtime == 1_700_000_000


def test_gnu_tar_extracts_the_stored_gzip(tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"".join(index(True).stream(read)))
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(tmp_path)], check=True)
    for key, name in NAMES.items():
        assert (tmp_path / name).read_bytes() == FILES[key]


def test_a_stored_file_of_another_size_breaks_the_stream() -> None:
    short = {**FILES, "k/weights": FILES["k/weights"][:-1]}
    with pytest.raises(OSError, match="k/weights"):
        b"".join(index(True).stream(lambda k: [short[k]]))
