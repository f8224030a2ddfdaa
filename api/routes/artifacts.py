"""A job's results (adapter or model files, archives, manifest) and their download."""

from __future__ import annotations

from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from sqlalchemy import or_, select

from api.content import stored_content
from api.crud import load_job
from api.deps import CurrentUser, SessionDep, StorageDep
from api.errors import APIError, not_found
from api.schemas import ArtifactOut, Page
from core.models import Artifact

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["artifacts"])


def artifact_out(a: Artifact) -> ArtifactOut:
    return ArtifactOut(
        id=a.id, created_at=int(a.created_at), fine_tuning_job_id=a.job_id, name=a.name, kind=a.kind,
        bytes=a.bytes, sha256=a.sha256,
    )


@router.get("/{job_id}/artifacts")
def list_fine_tuning_artifacts(job_id: str, user: CurrentUser, db: SessionDep) -> Page[ArtifactOut]:
    job = load_job(db, job_id, user)
    rows = db.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name, Artifact.id)).all()
    items = [artifact_out(a) for a in rows]
    return Page[ArtifactOut](
        data=items, has_more=False, first_id=items[0].id if items else None, last_id=items[-1].id if items else None
    )


# `:path` so that names with folders (final/adapter_config.json) work as well as ids.
@router.get("/{job_id}/artifacts/{artifact:path}/content", response_class=FileResponse)
def get_fine_tuning_artifact_content(
    job_id: str, artifact: str, user: CurrentUser, db: SessionDep, storage: StorageDep
) -> Response:
    job = load_job(db, job_id, user)
    row = db.scalar(
        select(Artifact)
        .where(Artifact.job_id == job.id, or_(Artifact.id == artifact, Artifact.name == artifact))
        .order_by(Artifact.created_at.desc())
        .limit(1)
    )
    if row is None:
        raise not_found("artifact", artifact)
    if not storage.exists(row.storage_key):
        raise APIError(404, f"the content of artifact {row.id} is missing from storage", code="content_missing")
    return stored_content(
        storage, row.storage_key, size=row.bytes, media_type="application/octet-stream",
        filename=PurePosixPath(row.name).name, headers={"X-Content-SHA256": row.sha256},
    )
