"""Users and API keys, for admins. `tuneq admin` does the same on the database directly."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body
from sqlalchemy import and_, or_, select

from api.deps import AdminUser, SessionDep, SettingsDep
from api.errors import bad_request, not_found
from api.pagination import DEFAULT_LIMIT, AfterQuery, LimitQuery, make_page, page_size
from api.schemas import (CreatedKeyOut, CreateKeyRequest, CreateUserRequest, KeyOut, Page, PriorityCap, TeamOut,
                         UserOut)
from core.identity import create_key, create_user, find_team, revoke_key
from core.policy import priority_cap
from core.models import ApiKey, Team, User

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def user_out(db: SessionDep, u: User) -> UserOut:
    team = db.get(Team, u.team_id) if u.team_id else None
    return UserOut(id=u.id, name=u.name, role=u.role, team=team.name if team else None, max_priority=u.max_priority,
                   priority_cap=priority_cap(db, u), created_at=int(u.created_at))


def key_out(k: ApiKey) -> KeyOut:
    return KeyOut(id=k.id, user_id=k.user_id, name=k.name, prefix=k.prefix, created_at=int(k.created_at),
                  revoked_at=None if k.revoked_at is None else int(k.revoked_at))


def load_user(db: SessionDep, user_id: str) -> User:
    u = db.get(User, user_id)
    if u is None:
        raise not_found("user", user_id)
    return u


@router.get("/users")
def list_users(
    admin: AdminUser, db: SessionDep, settings: SettingsDep, after: AfterQuery = None, limit: LimitQuery = DEFAULT_LIMIT
) -> Page[UserOut]:
    limit = page_size(limit, settings)
    stmt = select(User)
    if after is not None:
        cursor = db.get(User, after)
        if cursor is None:
            raise bad_request(f"after: no user with id {after!r}", "after")
        stmt = stmt.where(or_(User.created_at > cursor.created_at, and_(User.created_at == cursor.created_at, User.id > cursor.id)))
    rows = db.scalars(stmt.order_by(User.created_at, User.id).limit(limit + 1)).all()
    return make_page(rows, limit, lambda u: user_out(db, u))


@router.post("/users")
def create_admin_user(body: CreateUserRequest, admin: AdminUser, db: SessionDep) -> UserOut:
    user = create_user(db, body.name, body.role, body.team)
    db.commit()
    return user_out(db, user)


@router.get("/users/{user_id}")
def get_user(user_id: str, admin: AdminUser, db: SessionDep) -> UserOut:
    return user_out(db, load_user(db, user_id))


@router.patch("/users/{user_id}")
def set_user_priority_cap(user_id: str, body: PriorityCap, admin: AdminUser, db: SessionDep) -> UserOut:
    """Grant one user (a team lead, say) a priority cap of their own, over the team's."""
    user = load_user(db, user_id)
    user.max_priority = body.max_priority
    db.commit()
    return user_out(db, user)


@router.patch("/teams/{team}")
def set_team_priority_cap(team: str, body: PriorityCap, admin: AdminUser, db: SessionDep) -> TeamOut:
    """The highest priority the team's members may ask for. The team must exist (it is created with
    its first user): a mistyped name answers 404 rather than grant a cap to a team of nobody."""
    row = find_team(db, team)
    row.max_priority = body.max_priority
    db.commit()
    return TeamOut(id=row.id, name=row.name, max_priority=row.max_priority)


@router.get("/users/{user_id}/keys")
def list_user_keys(user_id: str, admin: AdminUser, db: SessionDep) -> Page[KeyOut]:
    user = load_user(db, user_id)
    rows = db.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.created_at, ApiKey.id)).all()
    items = [key_out(k) for k in rows]
    return Page[KeyOut](data=items, has_more=False, first_id=items[0].id if items else None,
                        last_id=items[-1].id if items else None)


@router.post("/users/{user_id}/keys")
def create_user_key(
    user_id: str, admin: AdminUser, db: SessionDep, body: Annotated[CreateKeyRequest | None, Body()] = None
) -> CreatedKeyOut:
    key, token = create_key(db, load_user(db, user_id), body.name if body else "")
    db.commit()
    return CreatedKeyOut(**key_out(key).model_dump(), key=token)


@router.post("/keys/{key_id}/revoke")
def revoke_api_key(key_id: str, admin: AdminUser, db: SessionDep) -> KeyOut:
    key = revoke_key(db, key_id)
    db.commit()
    return key_out(key)
