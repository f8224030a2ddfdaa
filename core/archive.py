"""Archives of stored files, built while they are downloaded instead of stored a second time.

A published model is kept once, file by file, in the artifact store. Its archive is only a
recipe (an index object: which stored keys, under which names, with which mtime); the API
streams the tar, or a .tar.gz whose deflate blocks are *stored*, from the member files at
download time. Weights do not compress, so gzip spends minutes of CPU for a few percent; a
stored-block gzip is still a valid .tar.gz for every client (`tar -xzf`, tarfile "r:gz"), and
its exact length and sha256 follow from the recipe, so the listing can give both.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

BLOCK = 512
END = b"\0" * (2 * BLOCK)  # two zero blocks end a tar
INDEX_SUFFIX = ".index.json"  # storage keys of archive recipes end so
STORED_MAX = 65535  # the largest deflate stored block
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0: the same bytes every time


@dataclass(frozen=True)
class Member:
    name: str  # path inside the archive; a trailing "/" makes it a directory
    key: str = ""  # storage key of a file's content
    size: int = 0
    mtime: int = 0

    def header(self) -> bytes:
        info = tarfile.TarInfo(self.name.rstrip("/"))
        info.mtime = self.mtime
        if self.name.endswith("/"):
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.size, info.mode = self.size, 0o644
        return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")


@dataclass(frozen=True)
class Index:
    members: list[Member]
    gzip: bool

    def to_json(self) -> bytes:
        return json.dumps({"gzip": self.gzip, "members": [asdict(m) for m in self.members]}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Index:
        data = json.loads(raw)
        return cls([Member(**m) for m in data["members"]], bool(data["gzip"]))

    def tar_bytes(self) -> int:
        return sum(len(m.header()) + _padded(m.size) for m in self.members) + len(END)

    def size(self) -> int:
        """The exact length of what stream() yields."""
        tar = self.tar_bytes()
        if not self.gzip:
            return tar
        return len(GZIP_HEADER) + tar + 5 * -(-tar // STORED_MAX) + 8

    def stream(self, read: Callable[[str], Iterable[bytes]]) -> Iterator[bytes]:
        """The archive's bytes; read(key) yields a member file's content."""
        tar = self._tar(read)
        return _stored_gzip(tar, self.tar_bytes()) if self.gzip else tar

    def _tar(self, read: Callable[[str], Iterable[bytes]]) -> Iterator[bytes]:
        for m in self.members:
            yield m.header()
            if m.name.endswith("/"):
                continue
            got = 0
            for chunk in read(m.key):
                got += len(chunk)
                yield chunk
            if got != m.size:  # the header promised m.size bytes: a short member breaks the archive
                raise OSError(f"stored file {m.key!r} has {got} bytes, the archive expects {m.size}")
            yield b"\0" * (_padded(m.size) - m.size)
        yield END


def digest(index: Index, read: Callable[[str], Iterable[bytes]]) -> str:
    h = hashlib.sha256()
    for chunk in index.stream(read):
        h.update(chunk)
    return h.hexdigest()


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _stored_gzip(chunks: Iterator[bytes], total: int) -> Iterator[bytes]:
    """gzip framing around stored deflate blocks of exactly STORED_MAX bytes (the last shorter)."""
    yield GZIP_HEADER
    crc, sent, buf = 0, 0, bytearray()
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
        buf += chunk
        while len(buf) >= STORED_MAX and sent + STORED_MAX < total:
            yield _block(bytes(buf[:STORED_MAX]), final=False)
            del buf[:STORED_MAX]
            sent += STORED_MAX
    if sent + len(buf) != total:
        raise OSError(f"archive is {sent + len(buf)} bytes, expected {total}")
    yield _block(bytes(buf), final=True)
    yield struct.pack("<II", crc, total & 0xFFFFFFFF)


def _block(data: bytes, final: bool) -> bytes:
    n = len(data)
    return bytes([1 if final else 0]) + struct.pack("<HH", n, n ^ 0xFFFF) + data
