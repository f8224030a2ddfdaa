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


MERGED = "merged"
# What a checkpoint archive leaves out: the optimizer, scheduler and RNG state only resume a run
# on the worker and can be several times the weights' size.
CHECKPOINT_RESUME_ONLY = {"optimizer.pt", "scheduler.pt", "rng.pt"}


def archive_name(method: str) -> str:
    return "model.tar.gz" if method in ("full", "freeze") else "adapter.tar.gz"


def _archive(storage: Storage, src: Path, key: str, name: str, kind: str, arcname: str, skip=lambda p: False) -> Stored:
    tar_path = src.parent / f".{Path(name).name}.tmp"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname=arcname, filter=lambda info: None if skip(info.name) else info)
    size, digest = storage.put_file(key, tar_path)
    tar_path.unlink()
    return Stored(name, kind, key, size, digest)


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
    root = name.removesuffix(".tar.gz")
    # The merged model has an archive of its own: an adapter download stays adapter-sized.
    stored.append(_archive(storage, final_dir, f"{prefix}/{name}", name, "archive", root,
                           skip=lambda n: n == f"{root}/{MERGED}" or n.startswith(f"{root}/{MERGED}/")))
    if (final_dir / MERGED).is_dir():
        stored.append(_archive(storage, final_dir / MERGED, f"{prefix}/merged.tar.gz", "merged.tar.gz", "archive", MERGED))
    stored += publish_checkpoints(storage, job, final_dir.parent / "checkpoints")
    return stored


def publish_checkpoints(storage: Storage, job: Job, checkpoints: Path) -> list[Stored]:
    """One checkpoints/step-N.tar.gz (weights, state.json, manifest.json) per kept checkpoint."""
    if not checkpoints.is_dir():
        return []
    stored = []
    for ck in sorted(p for p in checkpoints.iterdir() if p.is_dir() and (p / "state.json").is_file()):
        name = f"checkpoints/{ck.name}.tar.gz"
        stored.append(_archive(storage, ck, f"jobs/{job.id}/{name}", name, "checkpoint", ck.name,
                               skip=lambda n: n.rsplit("/", 1)[-1] in CHECKPOINT_RESUME_ONLY))
    return stored
