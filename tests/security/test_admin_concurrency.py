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


@pytest.mark.dialects
def test_team_cap_set_at_once_answers_each_request(admin, member) -> None:  # noqa: ANN001
    """Concurrent PATCHes of one team all succeed on a team that exists, and none creates one."""
    from core.models import Team

    answers = at_once(lambda i: admin.patch("/v1/admin/teams/red", json={"max_priority": i}))
    assert [r.status_code for r in answers] == [200] * CONCURRENT, [r.text for r in answers]
    answers = at_once(lambda i: admin.patch("/v1/admin/teams/nobody-here", json={"max_priority": i}))
    assert [r.status_code for r in answers] == [404] * CONCURRENT, [r.text for r in answers]
    assert count(Team, Team.name == "red") == 1 and count(Team, Team.name == "nobody-here") == 0


def test_patching_a_team_that_does_not_exist_is_404_naming_it(admin) -> None:  # noqa: ANN001
    from core.models import Team

    r = admin.patch("/v1/admin/teams/typo-team", json={"max_priority": 50})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["param"] == "team" and "typo-team" in r.json()["error"]["message"]
    assert count(Team, Team.name == "typo-team") == 0


@pytest.mark.parametrize("value", [True, False, "5", 2.0, "null"])
def test_a_priority_cap_is_a_strict_integer(admin, member, value) -> None:  # noqa: ANN001
    """`true` must not quietly grant cap 1 (above the default band: it preempts other teams)."""
    me = next(u for u in admin.get("/v1/admin/users").json()["data"] if u["name"] == "alice")
    for path in (f"/v1/admin/users/{me['id']}", "/v1/admin/teams/red"):
        r = admin.patch(path, json={"max_priority": value})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "max_priority", r.text
    assert admin.get(f"/v1/admin/users/{me['id']}").json()["priority_cap"] == 0
    assert admin.patch("/v1/admin/teams/red", json={"max_priority": 3}).json()["max_priority"] == 3
    assert admin.patch(f"/v1/admin/users/{me['id']}", json={"max_priority": None}).json()["priority_cap"] == 3
