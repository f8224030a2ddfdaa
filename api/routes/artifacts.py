"""A job's results (adapter or model files, archives, manifest) and their download."""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from api.content import attachment, stored_content
from api.deps import ReadableJob, SessionDep, StorageDep
from api.errors import APIError, not_found
from api.schemas import ArtifactOut, Page
from core.archive import INDEX_SUFFIX, Index
from core.models import Artifact
from core.storage import Storage

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["artifacts"])

# `NAME.tar` of an archive artifact `NAME.tar.gz`: the same files as a plain tar.
PLAIN_TAR = ".tar"


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(
        id=a.id, created_at=int(a.created_at), fine_tuning_job_id=a.job_id, name=a.name, kind=a.kind,
        bytes=a.bytes, sha256=a.sha256,
    )


@router.get("/{job_id}/artifacts")
def list_fine_tuning_artifacts(job: ReadableJob, db: SessionDep) -> Page[ArtifactOut]:
    rows = db.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name, Artifact.id)).all()
    items = [artifact_out(a) for a in rows]
    return Page[ArtifactOut](
        data=items, has_more=False, first_id=items[0].id if items else None, last_id=items[-1].id if items else None
    )


def find_artifact(db: Session, job_id: str, ref: str) -> Artifact | None:
    return db.scalar(
        select(Artifact)
        .where(Artifact.job_id == job_id, or_(Artifact.id == ref, Artifact.name == ref))
        .order_by(Artifact.created_at.desc())
        .limit(1)
    )


# `:path` so that names with folders (final/adapter_config.json) work as well as ids.
@router.get("/{job_id}/artifacts/{artifact:path}/content", response_class=FileResponse)
def get_fine_tuning_artifact_content(job: ReadableJob, artifact: str, db: SessionDep, storage: StorageDep) -> Response:
    """An artifact's bytes. `NAME.tar` of an archive `NAME.tar.gz` is the same files, not gzipped."""
    row = find_artifact(db, job.id, artifact)
    plain = False
    if row is None and artifact.endswith(PLAIN_TAR):
        row = find_artifact(db, job.id, artifact + ".gz")
        plain = row is not None and row.storage_key.endswith(INDEX_SUFFIX)
        if not plain:
            row = None
    if row is None:
        raise not_found("artifact", artifact)
    if not storage.exists(row.storage_key):
        raise APIError(404, f"the content of artifact {row.id} is missing from storage", code="content_missing")
    if row.storage_key.endswith(INDEX_SUFFIX):
        return archive_content(storage, row, plain)
    return stored_content(
        storage, row.storage_key, size=row.bytes, media_type="application/octet-stream",
        filename=PurePosixPath(row.name).name, headers={"X-Content-SHA256": row.sha256},
    )


def archive_content(storage: Storage, row: Artifact, plain: bool) -> Response:
    """An archive built from its stored files while it is sent (core.archive)."""
    index = Index.from_json(b"".join(storage.iter_bytes(row.storage_key)))
    missing = [m.key for m in index.members if m.key and not storage.exists(m.key)]
    if missing:
        raise APIError(404, f"artifact {row.id}: {len(missing)} of its files are missing from storage "
                            f"(first: {missing[0]})", code="content_missing")
    name = PurePosixPath(row.name).name
    headers = {"Content-Disposition": attachment(name)}
    if plain:
        index = Index(index.members, gzip=False)
        headers["Content-Disposition"] = attachment(name.removesuffix(".gz"))
    else:
        headers["X-Content-SHA256"] = row.sha256  # the listing's: what was streamed at publishing
    headers["Content-Length"] = str(index.size())
    media = "application/x-tar" if plain else "application/gzip"
    return StreamingResponse(index.stream(storage.iter_bytes), media_type=media, headers=headers)
