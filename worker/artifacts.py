"""Publishing a finished job's final/ directory into artifact storage."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from core.models import Artifact, Job
from core.storage import Storage


@dataclass
class Stored:
    name: str
    kind: str
    key: str
    bytes: int
    sha256: str

    def row(self, job_id: str) -> Artifact:
        return Artifact(job_id=job_id, name=self.name, kind=self.kind, storage_key=self.key, bytes=self.bytes,
                        sha256=self.sha256)


def archive_name(method: str) -> str:
    return "model.tar.gz" if method == "full" else "adapter.tar.gz"


def publish_final(storage: Storage, job: Job, final_dir: Path) -> list[Stored]:
    """Copy every file of final_dir, and one tar.gz of it, into storage under jobs/{id}/.

    Runs outside any DB transaction: copying a full model takes long, and SQLite would hold its
    write lock all that time. The caller adds the rows together with the final transition.
    """
    prefix = f"jobs/{job.id}"
    stored = []
    for path in sorted(p for p in final_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(final_dir).as_posix()
        key = f"{prefix}/final/{rel}"
        size, digest = storage.put_file(key, path)
        kind = "manifest" if rel == "manifest.json" else "file"
        stored.append(Stored(f"final/{rel}", kind, key, size, digest))
    name = archive_name(job.method)
    tar_path = final_dir.parent / name
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(final_dir, arcname=name.removesuffix(".tar.gz"))
    size, digest = storage.put_file(f"{prefix}/{name}", tar_path)
    tar_path.unlink()
    stored.append(Stored(name, "archive", f"{prefix}/{name}", size, digest))
    return stored
