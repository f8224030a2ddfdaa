"""Request dependencies: a database session per request, the settings, the artifact store, the
caller, and the job a route's path names (api.crud holds the lookups themselves)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.crud import load_job
from api.errors import APIError
from core.db import get_sessionmaker
from core.identity import authenticate, is_admin
from core.models import Job, User
from core.settings import Settings, get_settings
from core.storage import Storage, get_storage


def get_db() -> Iterator[Session]:
    # Routes commit explicitly (a job is committed before it is enqueued); what they leave
    # uncommitted on an error is rolled back here.
    session = get_sessionmaker()()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


# auto_error=False: a missing key must answer in tuneq's error envelope, not FastAPI's default.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tq_...`.")


def get_current_user(db: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> User:
    if credentials is None:
        raise APIError(401, "missing API key; send `Authorization: Bearer <key>`", code="missing_api_key")
    user = authenticate(db, credentials.credentials)
    if user is None:
        raise APIError(401, "invalid or revoked API key", code="invalid_api_key")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin_user(user: CurrentUser) -> User:
    if not is_admin(user):
        raise APIError(403, "this route is for admins only", code="admin_only")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def get_readable_job(job_id: str, user: CurrentUser, db: SessionDep) -> Job:
    return load_job(db, job_id, user)


def get_changeable_job(job_id: str, user: CurrentUser, db: SessionDep) -> Job:
    return load_job(db, job_id, user, change=True)


# The job of a `/{job_id}` route: 404 if the caller may not see it; ChangeableJob also 403 if
# the caller may see but not change it (a teammate's).
ReadableJob = Annotated[Job, Depends(get_readable_job)]
ChangeableJob = Annotated[Job, Depends(get_changeable_job)]
