"""Publishing a finished job's final/ directory (and its kept checkpoints) into artifact storage.

Each file is stored once, as it is: linked into a local store on the same disk (no bytes
written) and then removed from the work directory, else streamed or uploaded to the store. The archives a user downloads (`adapter.tar.gz`, `model.tar.gz`,
`merged.tar.gz`, `checkpoints/step-N.tar.gz`) are recipes over those files that the API streams
(core.archive): nothing is compressed, and no second or third copy of the weights is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from core.archive import INDEX_SUFFIX, Index, Member, digest
from core.models import Artifact, Job
from core.storage import CHUNK, Storage, sha256_file

log = logging.getLogger(__name__)


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

    Idempotent: an attempt cut short (a killed worker) left some files in the store and the rest
    here, and the next attempt completes it. Sizes and sha256 come from the trainer's manifest
    and are checked wherever bytes are copied. Runs outside any DB transaction (SQLite would hold
    its write lock all along); the caller adds the rows with the final transition.
    """
    prefix = f"jobs/{job.id}"
    raw = final_manifest(storage, job.id, final_dir)
    if raw is None:
        raise FinalMissing(f"{final_dir / MANIFEST} is missing: the trainer did not finish its export")
    manifest = json.loads(raw)
    files: dict[str, dict[str, Any]] = {PurePosixPath(k).as_posix(): v for k, v in manifest["files"].items()}
    files[MANIFEST] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    up = Uploads(storage)
    stored = []
    for rel in [*sorted(k for k in files if k != MANIFEST), MANIFEST]:  # the manifest last, as written
        key, want = f"{prefix}/final/{rel}", files[rel]
        if (final_dir / rel).is_file():
            size, sha = up.put(key, final_dir / rel)
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
    stored.append(up.archive(f"{prefix}/{name}", name, "archive", root, main, mtime))
    merged = {rel.removeprefix(f"{MERGED}/"): s for rel, s in weights.items() if rel.startswith(f"{MERGED}/")}
    if merged:
        stored.append(up.archive(f"{prefix}/merged.tar.gz", "merged.tar.gz", "archive", MERGED, merged, mtime))
    stored += publish_checkpoints(up, job, final_dir.parent / "checkpoints", checkpoints, mtime)
    # Only now: the archives were hashed from these local files, not read back from the store.
    # The store holds the model; the work directory keeps no second copy.
    for key in up.local:
        if key.startswith(f"{prefix}/final/"):
            up.local[key].unlink()
    return stored


def publish_checkpoints(up: Uploads, job: Job, local: Path, prefixes: Sequence[str], mtime: int) -> list[Stored]:
    """One checkpoints/step-N.tar.gz (weights, state.json, manifest.json) per kept checkpoint,
    over the files uploaded while the job trained (worker.checkpoint_store); hashed from this
    host's copies in `local` where they are the same bytes."""
    stored = []
    for prefix in sorted(prefixes):
        raw = b"".join(up.storage.iter_bytes(f"{prefix}/{MANIFEST}"))
        ck = prefix.rsplit("/", 1)[-1]
        files = {rel: Stored(rel, "file", f"{prefix}/{rel}", want["bytes"], want["sha256"])
                 for rel, want in json.loads(raw)["files"].items() if rel not in CHECKPOINT_RESUME_ONLY}
        files[MANIFEST] = Stored(MANIFEST, "file", f"{prefix}/{MANIFEST}", len(raw), hashlib.sha256(raw).hexdigest())
        for rel, s in files.items():
            # A re-save of the same step (a pause just after a resume) may differ in its bytes.
            if (local / ck / rel).is_file() and sha256_file(local / ck / rel) == s.sha256:
                up.local[s.key] = local / ck / rel
        name = f"checkpoints/{ck}.tar.gz"
        stored.append(up.archive(f"jobs/{job.id}/{name}", name, "checkpoint", ck, files, mtime))
    return stored


class Uploads:
    """Files put into the store by one publishing, and the archives' recipes over them."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.local: dict[str, Path] = {}  # key -> the local file it came from, still in place

    def put(self, key: str, path: Path) -> tuple[int, str | None]:
        # Kept in place (linked, not moved) until the archives are hashed: read from this disk,
        # not back from a remote store.
        out = self.storage.adopt(key, path, keep=True)
        self.local[key] = path
        return out

    def read(self, key: str) -> Iterator[bytes]:
        if key not in self.local:  # stored by an earlier attempt
            yield from self.storage.iter_bytes(key)
            return
        with open(self.local[key], "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def archive(self, key: str, name: str, kind: str, root: str, files: dict[str, Stored], mtime: int) -> Stored:
        """Store the recipe of a .tar.gz of `files` (relative path -> stored file) under root/.

        Its length and sha256 are those of the bytes the API will stream: one read of the files.
        """
        dirs = {f"{root}/"} | {f"{root}/{parent}/" for rel in files for parent in _parents(rel)}
        members = [Member(d, mtime=mtime) for d in sorted(dirs)]
        members += [Member(f"{root}/{rel}", s.key, s.bytes, mtime) for rel, s in sorted(files.items())]
        index = Index(members, gzip=True)
        sha = digest(index, self.read)
        index_key = key + INDEX_SUFFIX
        self.storage.put_stream(index_key, io.BytesIO(index.to_json()))
        return Stored(name, kind, index_key, index.size(), sha)


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def _archive(storage: Storage, src: Path, key: str, name: str, kind: str, arcname: str) -> Stored:
    """A real, compressed tar.gz stored whole: for small folders of text (TensorBoard logs, W&B runs)."""
    tar_path = src.parent / f".{Path(name).name}.tmp"
    with tarfile.open(tar_path, "w:gz") as tar:
        # Links are left out: a W&B run links its debug logs to files outside the folder, which
        # safe extraction (tarfile's "data" filter, `tuneq download`) refuses.
        tar.add(src, arcname=arcname, filter=lambda member: None if member.issym() or member.islnk() else member)
    size, sha = storage.put_file(key, tar_path)
    tar_path.unlink()
    return Stored(name, kind, key, size, sha)


# The kind of the artifacts that hold a job's curves (TensorBoard files, an offline W&B run).
LOGS_KIND = "logs"


def publish_logs(storage: Storage, folder: Path, job_id: str, attempt: int, name: str) -> Stored | None:
    """Archive a folder of a job's curves as the artifact `name` (e.g. tensorboard.tar.gz); None
    when the folder is missing or empty, or when storing it failed.

    The key carries the attempt: stored keys are never rewritten, and a later run of the same job
    (after a lost lease) publishes its own.
    """
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    key = f"jobs/{job_id}/{name.removesuffix('.tar.gz')}-{attempt}.tar.gz"
    try:
        return _archive(storage, folder, key, name, LOGS_KIND, folder.name)
    except Exception:  # noqa: BLE001 - any storage error
        # Curves are a convenience: their loss must not fail a trained job.
        log.warning("job %s: could not publish %s", job_id, name, exc_info=True)
        return None
