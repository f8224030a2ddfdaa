"""Admins' user and team changes sent at once: each answers as it would alone, never 500.

A team is created implicitly by the first user put in it; requests naming the same new team, or
the same new user name, race on the names' unique keys. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import func, select

CONCURRENT = 10


def at_once(call: Callable[[int], Any]) -> list[Any]:
    """call(i) for each of CONCURRENT threads, all released together."""
    barrier = threading.Barrier(CONCURRENT)

    def run(i: int) -> Any:
        barrier.wait(30)
        return call(i)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(run, range(CONCURRENT)))


def count(model: type, *where: Any) -> int:
    from core.db import session_scope

    with session_scope() as db:
        return db.scalar(select(func.count()).select_from(model).where(*where))


@pytest.mark.dialects
def test_one_name_created_at_once_is_one_user_and_409s(admin) -> None:  # noqa: ANN001
    from core.models import Team, User

    admin.get("/v1/admin/users")
    answers = at_once(lambda _: admin.post("/v1/admin/users", json={"name": "dup", "team": "new-team"}))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * (CONCURRENT - 1), [r.text for r in answers]
    assert {r.json()["error"]["code"] for r in answers if r.status_code == 409} == {"user_exists"}
    assert count(User, User.name == "dup") == 1
    assert count(Team, Team.name == "new-team") == 1


@pytest.mark.dialects
def test_users_created_at_once_into_one_new_team_all_join_it(admin) -> None:  # noqa: ANN001
    from core.models import Team, User

    admin.get("/v1/admin/users")
    answers = at_once(lambda i: admin.post("/v1/admin/users", json={"name": f"u{i}", "team": "fresh"}))
    assert [r.status_code for r in answers] == [200] * CONCURRENT, [r.text for r in answers]
    assert {r.json()["team"] for r in answers} == {"fresh"}
    assert count(Team, Team.name == "fresh") == 1
    assert count(User, User.name.like("u%")) == CONCURRENT
