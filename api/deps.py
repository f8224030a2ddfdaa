"""Request dependencies: a database session per request, the settings, the artifact store, the
caller, and the job a route's path names (api.crud holds the lookups themselves)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy.orm import Session

from api.crud import load_job
from api.errors import APIError
from core.db import get_sessionmaker, read_session
from core.identity import authenticate, is_admin
from core.models import Job, User
from core.settings import Settings, get_settings
from core.storage import Storage, get_storage

T = TypeVar("T")


async def get_db() -> AsyncIterator[Session]:
    # Routes commit explicitly (a job is committed before it is enqueued); what they leave
    # uncommitted is rolled back when the session closes. It closes as soon as the route
    # function returns (scope="function"), on the event loop: a connection returned to the pool
    # must not wait for the response to be sent, nor for a free thread, or a burst of requests
    # holds every pooled connection while the threads that would free them wait for one.
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db, scope="function")]


async def _settings() -> Settings:
    # async: FastAPI runs a sync dependency on a worker thread, a hop per request for a cached value.
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]  # sync: building an S3 client may block


# auto_error=False: a missing key must answer in tuneq's error envelope, not FastAPI's default.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer tq_...`.")


async def bearer_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The presented key, unchecked: on the event loop, no database."""
    if credentials is None:
        raise APIError(401, "missing API key; send `Authorization: Bearer <key>`", code="missing_api_key")
    return credentials.credentials


BearerToken = Annotated[str, Depends(bearer_token)]


def authenticated(db: Session, token: str) -> User:
    user = authenticate(db, token)
    if user is None:
        raise APIError(401, "invalid or revoked API key", code="invalid_api_key")
    return user


def get_current_user(db: SessionDep, token: BearerToken) -> User:
    try:
        return authenticated(db, token)
    finally:
        # End the read: FastAPI runs the route on another thread hop, and a connection held while
        # the request waits for a thread is how a burst of requests drained the pool (each holding
        # one, none able to run). The user stays loaded (expire_on_commit=False).
        db.commit()


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_admin_user(user: CurrentUser) -> User:
    if not is_admin(user):
        raise APIError(403, "this route is for admins only", code="admin_only")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def get_readable_job(job_id: str, user: CurrentUser, db: SessionDep) -> Job:
    job = load_job(db, job_id, user)
    db.commit()  # as in get_current_user: no connection held across the hop to the route
    return job


def get_changeable_job(job_id: str, user: CurrentUser, db: SessionDep) -> Job:
    job = load_job(db, job_id, user, change=True)
    db.commit()  # as in get_current_user: no connection held across the hop to the route
    return job


# The job of a `/{job_id}` route: 404 if the caller may not see it; ChangeableJob also 403 if
# the caller may see but not change it (a teammate's).
ReadableJob = Annotated[Job, Depends(get_readable_job)]
ChangeableJob = Annotated[Job, Depends(get_changeable_job)]


async def read_in_one_hop(work: Callable[..., BaseModel], token: str, *args: Any) -> Response:
    """A read route's whole work on one worker thread: key check, queries, rendering.

    The routes clients poll (a job, the job list, an event page) run here instead of as a sync
    dependency chain, which FastAPI runs as one thread hop per dependency (the key, the job, the
    route: three waits for a thread and for the interpreter lock, each a wait for a CPU on a
    busy machine). The session is this hop's alone, reads only (core.db.read_session: no
    transaction round trips on PostgreSQL) and closes before the answer is sent; the answer is
    the model's JSON, rendered once on the thread (`work(db, user, *args)` returns it).
    """
    return Response(await in_one_hop(_rendered, token, work, *args), media_type="application/json")


def _rendered(db: Session, user: User, work: Callable[..., BaseModel], *args: Any) -> bytes:
    return work(db, user, *args).model_dump_json().encode()


async def in_one_hop(work: Callable[..., T], token: str, *args: Any, limiter: anyio.CapacityLimiter | None = None) -> T:
    """`work(db, user, *args)` after the key check, on one worker thread with a read-only session
    of its own (see read_in_one_hop), closed before this returns. `limiter`: the threads this
    kind of work may hold at once (default: the shared pool's)."""

    def run() -> T:
        with read_session() as db:
            return work(db, authenticated(db, token), *args)

    return await anyio.to_thread.run_sync(run, limiter=limiter)
