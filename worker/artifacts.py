"""Publishing a finished job's final/ directory (and its kept checkpoints) into artifact storage.

Each file is stored once, as it is: moved into a local store on the same disk (no bytes
written), else streamed to it. The archives a user downloads (`adapter.tar.gz`, `model.tar.gz`,
`merged.tar.gz`, `checkpoints/step-N.tar.gz`) are recipes over those files that the API streams
(core.archive): nothing is compressed, and no second or third copy of the weights is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.archive import INDEX_SUFFIX, Index, Member, digest
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


class FinalMissing(RuntimeError):
    """A file of the trained model is neither in the work directory nor in the store."""


MERGED = "merged"
MANIFEST = "manifest.json"  # written last by the trainer's export: its presence means final/ is whole
# What a checkpoint archive leaves out: the optimizer, scheduler and RNG state only resume a run
# on the worker and can be several times the weights' size.
CHECKPOINT_RESUME_ONLY = {"optimizer.pt", "scheduler.pt", "rng.pt"}


def archive_name(method: str) -> str:
    return "model.tar.gz" if method in ("full", "freeze") else "adapter.tar.gz"


def final_manifest(storage: Storage, job_id: str, final_dir: Path) -> bytes | None:
    """final/manifest.json of a finished training: in the work directory, or in the store when
    an earlier attempt had already moved it there; None when neither holds it."""
    local = final_dir / MANIFEST
    if local.is_file():
        return local.read_bytes()
    key = f"jobs/{job_id}/final/{MANIFEST}"
    if storage.exists(key):
        return b"".join(storage.iter_bytes(key))
    return None


def publish_final(storage: Storage, job: Job, final_dir: Path, checkpoints: Sequence[str] = ()) -> list[Stored]:
    """Store every file of final/ under jobs/{id}/final/, then the archives' recipes (also one
    per kept checkpoint: `checkpoints` are their folders in the store).

    Idempotent: an attempt cut short (a killed worker) left some files moved into the store and
    the rest here, and the next attempt completes it. Sizes and sha256 come from the trainer's
    manifest and are checked wherever bytes are copied. Runs outside any DB transaction (SQLite
    would hold its write lock all along); the caller adds the rows with the final transition.
    """
    prefix = f"jobs/{job.id}"
    raw = final_manifest(storage, job.id, final_dir)
    if raw is None:
        raise FinalMissing(f"{final_dir / MANIFEST} is missing: the trainer did not finish its export")
    manifest = json.loads(raw)
    files: dict[str, dict[str, Any]] = {PurePosixPath(k).as_posix(): v for k, v in manifest["files"].items()}
    files[MANIFEST] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    stored = []
    for rel in [*sorted(k for k in files if k != MANIFEST), MANIFEST]:  # the manifest last, as written
        key, want = f"{prefix}/final/{rel}", files[rel]
        local = final_dir / rel
        if local.is_file():
            size, sha = storage.adopt(key, local, keep=False)
            if size != want["bytes"] or sha not in (None, want["sha256"]):
                raise OSError(f"final/{rel}: {size} bytes stored, sha256 {sha}; the manifest says {want}")
        elif not storage.exists(key):
            raise FinalMissing(f"final/{rel} is neither in {final_dir} nor in the store")
        stored.append(Stored(f"final/{rel}", "manifest" if rel == MANIFEST else "file", key, want["bytes"],
                             want["sha256"]))
    mtime = int(manifest.get("created") or 0)
    name = archive_name(job.method)
    root = name.removesuffix(".tar.gz")
    weights = {s.name.removeprefix("final/"): s for s in stored}
    # The merged model has an archive of its own: an adapter download stays adapter-sized.
    main = {rel: s for rel, s in weights.items() if not rel.startswith(f"{MERGED}/")}
    stored.append(archive(storage, f"{prefix}/{name}", name, "archive", root, main, mtime))
    merged = {rel.removeprefix(f"{MERGED}/"): s for rel, s in weights.items() if rel.startswith(f"{MERGED}/")}
    if merged:
        stored.append(archive(storage, f"{prefix}/merged.tar.gz", "merged.tar.gz", "archive", MERGED, merged, mtime))
    stored += publish_checkpoints(storage, job, checkpoints, mtime)
    return stored


def publish_checkpoints(storage: Storage, job: Job, prefixes: Sequence[str], mtime: int) -> list[Stored]:
    """One checkpoints/step-N.tar.gz (weights, state.json, manifest.json) per kept checkpoint,
    over the files already uploaded while the job trained (worker.checkpoint_store)."""
    stored = []
    for prefix in sorted(prefixes):
        raw = b"".join(storage.iter_bytes(f"{prefix}/{MANIFEST}"))
        files = {rel: Stored(rel, "file", f"{prefix}/{rel}", want["bytes"], want["sha256"])
                 for rel, want in json.loads(raw)["files"].items() if rel not in CHECKPOINT_RESUME_ONLY}
        files[MANIFEST] = Stored(MANIFEST, "file", f"{prefix}/{MANIFEST}", len(raw), hashlib.sha256(raw).hexdigest())
        ck = prefix.rsplit("/", 1)[-1]
        name = f"checkpoints/{ck}.tar.gz"
        stored.append(archive(storage, f"jobs/{job.id}/{name}", name, "checkpoint", ck, files, mtime))
    return stored


def archive(storage: Storage, key: str, name: str, kind: str, root: str, files: dict[str, Stored],
            mtime: int) -> Stored:
    """Store the recipe of a .tar.gz of `files` (relative path -> stored file) under root/.

    Its length and sha256 are those of the bytes the API will stream: one read of the files.
    """
    dirs = {f"{root}/"} | {f"{root}/{parent}/" for rel in files for parent in _parents(rel)}
    members = [Member(d, mtime=mtime) for d in sorted(dirs)]
    members += [Member(f"{root}/{rel}", s.key, s.bytes, mtime) for rel, s in sorted(files.items())]
    index = Index(members, gzip=True)
    sha = digest(index, storage.iter_bytes)
    index_key = key + INDEX_SUFFIX
    storage.put_stream(index_key, io.BytesIO(index.to_json()))
    return Stored(name, kind, index_key, index.size(), sha)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _archive(storage: Storage, src: Path, key: str, name: str, kind: str, arcname: str) -> Stored:
    """A real, compressed tar.gz stored whole: for small folders of text (TensorBoard logs)."""
    tar_path = src.parent / f".{Path(name).name}.tmp"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(src, arcname=arcname)
    size, sha = storage.put_file(key, tar_path)
    tar_path.unlink()
    return Stored(name, kind, key, size, sha)
