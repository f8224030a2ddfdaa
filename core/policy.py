"""Who may ask for which job priority, and whose jobs a priority may preempt.

Priorities run from -100 to 100. Without a grant, a user may ask for at most the service's
default band's top (TUNEQ_MEMBER_MAX_PRIORITY, 0): lowering a job is always allowed, raising it
above the band needs an admin's grant, to a team (every member) or to one user (a team lead,
say). Admins may ask for any priority. A job within the default band preempts only jobs of its
own team; only a granted priority above the band preempts other teams' jobs.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from core.identity import is_admin
from core.limits import LimitExceeded
from core.models import Team, User
from core.settings import Settings, get_settings

LOWEST, HIGHEST = -100, 100


def priority_cap(db: Session, user: User, settings: Settings | None = None) -> int:
    """The highest priority `user` may give a job: own grant, else the team's, else the default band."""
    settings = settings or get_settings()
    if is_admin(user):
        return HIGHEST
    if user.max_priority is not None:
        return user.max_priority
    team = db.get(Team, user.team_id) if user.team_id else None
    if team is not None and team.max_priority is not None:
        return team.max_priority
    return settings.member_max_priority


def check_priority(db: Session, user: User, priority: int, settings: Settings | None = None) -> None:
    cap = priority_cap(db, user, settings)
    if priority > cap:
        raise LimitExceeded(
            f"priority: {priority} is above your cap of {cap}; an admin sets caps per team or user "
            "(PATCH /v1/admin/teams/{name} or /v1/admin/users/{id}, field max_priority)",
            "priority_above_cap", "priority",
        )


def may_preempt(db: Session, head_priority: int, head_owner: str | None, victim_owner: str | None,
                settings: Settings | None = None) -> bool:
    """Whether a waiting job of `head_owner` may pause a running job of `victim_owner` (lower priority)."""
    settings = settings or get_settings()
    if head_priority > settings.member_max_priority:
        return True  # a granted priority: across teams
    if head_owner is None or victim_owner is None:
        return head_owner == victim_owner
    if head_owner == victim_owner:
        return True
    head, victim = db.get(User, head_owner), db.get(User, victim_owner)
    return head is not None and victim is not None and head.team_id is not None and head.team_id == victim.team_id
