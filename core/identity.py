"""Users, teams and API keys; who may see and change which job or file.

A key is `tq_<key id>_<secret>`. Only its sha256 is stored, and a presented key is found by its
id and then compared in constant time, so neither the database nor response timing gives a key
away. The token is returned once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from core.db import dialect_insert
from core.models import ApiKey, File, Job, Team, User, new_id, now

ADMIN = "admin"
MEMBER = "member"
ROLES = (ADMIN, MEMBER)
TOKEN_PREFIX = "tq_"
# 32 random bytes: guessing is hopeless, so a fast hash (sha256) is enough; no password KDF needed.
SECRET_BYTES = 32
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$")
# A key id is hex; the secret is urlsafe base64 and may itself contain '_'.
_TOKEN = re.compile(r"^tq_([0-9a-f]{24})_([A-Za-z0-9_-]{20,100})$")


class IdentityError(ValueError):
    """A request about users or keys that cannot be honoured; `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str, what: str = "name") -> str:
    if not _NAME.match(name or ""):
        raise IdentityError(f"{what}: {name!r} is not a valid name (letters, digits, '.', '_', '@', '-'; up to 200)", what)
    return name


def get_or_create_team(db: Session, name: str) -> Team:
    """The team named `name`, created on first use.

    Insert-or-get: requests naming a new team at once (users created into it, its cap set) all
    end with the one row. A plain INSERT after a SELECT that found none fails on the name's unique
    key in all but the first; ON CONFLICT waits for the first to commit and then leaves its row.
    """
    check_name(name, "team")
    team = db.scalar(select(Team).where(Team.name == name))
    if team is None:
        db.execute(dialect_insert(db, Team).values(id=new_id("team"), name=name, created_at=now())
                   .on_conflict_do_nothing(index_elements=["name"]))
        team = db.scalar(select(Team).where(Team.name == name))
    return team


def find_team(db: Session, name: str) -> Team:
    """An existing team by name; IdentityError (404) otherwise."""
    team = db.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise IdentityError(f"team: no team named {name!r}; a team is created with its first user "
                            "(POST /v1/admin/users with `team`)", "team", "not_found")
    return team


def create_user(db: Session, name: str, role: str = MEMBER, team: str | None = None) -> User:
    """A new user (the caller commits); its team is created on first use."""
    check_name(name, "name")
    if role not in ROLES:
        raise IdentityError(f"role: must be 'admin' or 'member', got {role!r}", "role")
    exists = IdentityError(f"name: a user named {name!r} exists already", "name", "user_exists")
    if db.scalar(select(User).where(User.name == name)) is not None:
        raise exists
    team_id = get_or_create_team(db, team).id if team else None
    # Two requests creating one name at once both pass the SELECT above: the second's insert
    # finds the first's row (once that commits) and inserts nothing, which is the refusal.
    user_id = new_id("user")
    db.execute(dialect_insert(db, User).values(id=user_id, name=name, role=role, team_id=team_id, created_at=now())
               .on_conflict_do_nothing(index_elements=["name"]))
    user = db.get(User, user_id)  # read back: rowcount of an insert that did nothing was seen nonzero on SQLite
    if user is None:
        raise exists
    return user


def find_user(db: Session, ref: str) -> User | None:
    """A user by id or by name."""
    return db.get(User, ref) or db.scalar(select(User).where(User.name == ref))


def create_key(db: Session, user: User, name: str = "") -> tuple[ApiKey, str]:
    """A new key for `user` and its token; the token exists only in this return value."""
    key_hex = secrets.token_hex(12)
    token = f"{TOKEN_PREFIX}{key_hex}_{secrets.token_urlsafe(SECRET_BYTES)}"
    key = ApiKey(id=f"key-{key_hex}", user_id=user.id, name=name[:200], prefix=f"{TOKEN_PREFIX}{key_hex}",
                 token_sha256=_sha256(token))
    db.add(key)
    db.flush()
    return key, token


def revoke_key(db: Session, key_id: str) -> ApiKey:
    key = db.get(ApiKey, key_id)
    if key is None:
        raise IdentityError(f"no API key with id {key_id!r}", "key_id", "not_found")
    if key.revoked_at is None:
        key.revoked_at = now()
    return key


# A key and its user in one query: every request runs it.
_KEY_AND_USER = (select(User, ApiKey.token_sha256, ApiKey.revoked_at).join(ApiKey, ApiKey.user_id == User.id)
                 .where(ApiKey.id == bindparam("key_id")))


def authenticate(db: Session, token: str) -> User | None:
    """The user a bearer token belongs to, or None for an unknown, malformed or revoked key."""
    m = _TOKEN.match(token or "")
    row = db.execute(_KEY_AND_USER, {"key_id": f"key-{m.group(1)}"}).one_or_none() if m else None
    # Compare even when there is no such key, so a miss costs what a hit costs.
    expected = row.token_sha256 if row is not None else "0" * 64
    if not hmac.compare_digest(expected, _sha256(token or "")) or row is None or row.revoked_at is not None:
        return None
    return row.User


def bootstrap_admin(db: Session, name: str = "admin") -> str | None:
    """On a database without any admin: create one with a key and return its token (else None)."""
    if db.scalar(select(func.count()).select_from(User).where(User.role == ADMIN)):
        return None
    user = find_user(db, name) or create_user(db, name, ADMIN)
    user.role = ADMIN
    _, token = create_key(db, user, "bootstrap")
    return token


# ------------------------------------------------------------------------------- object access


def is_admin(user: User) -> bool:
    return user.role == ADMIN


def team_member_ids(user: User):  # noqa: ANN201 - a SQL subquery
    return select(User.id).where(User.team_id == user.team_id)


def can_read_job(db: Session, user: User, job: Job) -> bool:
    """Admins see all jobs; others their own and their team's."""
    if is_admin(user) or (job.owner_id is not None and job.owner_id == user.id):
        return True
    if user.team_id is None or job.owner_id is None:
        return False
    owner = db.get(User, job.owner_id)
    return owner is not None and owner.team_id == user.team_id


def can_change_job(user: User, job: Job) -> bool:
    """Teammates may watch a job; only its owner or an admin may cancel, pause or resume it."""
    return is_admin(user) or (job.owner_id is not None and job.owner_id == user.id)


def readable_jobs(user: User):  # noqa: ANN201 - a SQL condition
    if is_admin(user):
        return Job.id.is_not(None)
    if user.team_id is None:
        return Job.owner_id == user.id
    return Job.owner_id.in_(team_member_ids(user))


# A deleted file keeps its row (finished jobs still name it) but not its bytes; nobody sees it.
DELETED = "deleted"


def can_read_file(user: User, f: File) -> bool:
    """Files hold training data: only their owner (and admins) may read or train on them."""
    return f.status != DELETED and (is_admin(user) or (f.owner_id is not None and f.owner_id == user.id))


def readable_files(user: User):  # noqa: ANN201 - a SQL condition
    mine = File.id.is_not(None) if is_admin(user) else File.owner_id == user.id
    return mine & (File.status != DELETED)
