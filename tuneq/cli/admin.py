"""`tuneq admin`: users and API keys, written straight to the database (no key needed: keys start here)."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer

from tuneq.cli.common import F, OneLineErrors, err, fail, friendly

app = typer.Typer(
    cls=OneLineErrors, no_args_is_help=True,
    help="Users and API keys, written straight to the database ($TUNEQ_DATABASE_URL, default $TUNEQ_HOME/tuneq.db): "
    "they are how access starts, so they cannot need a key themselves.",
)


def _admin_session():  # noqa: ANN202 - a context manager of core.db
    from core.db import session_scope

    return session_scope()


def _database_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        from core.identity import IdentityError

        try:
            return fn(*args, **kwargs)
        except IdentityError as exc:
            raise fail(str(exc)) from None
        except (OperationalError, ProgrammingError) as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig is not None else type(exc).__name__
            raise fail(f"database: {reason}; is TUNEQ_DATABASE_URL right and migrated (`python -m core.migrate`)?") from None

    return wrapper  # type: ignore[return-value]


@app.command("create-user")
@friendly
@_database_errors
def create_user_cmd(
    name: Annotated[str, typer.Argument(help="A unique user name.")],
    role: Annotated[str, typer.Option(help="admin | member.")] = "member",
    team: Annotated[str | None, typer.Option(help="Team name; created on first use. Teammates can read each other's jobs.")] = None,
) -> None:
    """Create a user; print its id."""
    from core.identity import create_user

    with _admin_session() as db:
        user = create_user(db, name, role, team)
        user_id = user.id
    err.print(f"created {role} {name}" + (f" in team {team}" if team else "") + f"; give them a key with `tuneq admin create-key {name}`")
    print(user_id)


@app.command("create-key")
@friendly
@_database_errors
def create_key_cmd(
    user: Annotated[str, typer.Argument(metavar="USER", help="User name or id.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
) -> None:
    """Create an API key for USER and print it. It is shown only this once."""
    from core.identity import IdentityError, create_key, find_user

    with _admin_session() as db:
        found = find_user(db, user)
        if found is None:
            raise IdentityError(f"no user {user!r}; create it with `tuneq admin create-user`")
        key, token = create_key(db, found, name)
        key_id = key.id
    err.print(f"created {key_id} for {user}; the key is shown only now, store it (e.g. TUNEQ_API_KEY)")
    print(token)


@app.command("revoke-key")
@friendly
@_database_errors
def revoke_key_cmd(key_id: Annotated[str, typer.Argument(metavar="KEY_ID", help="A key id (key-...).")]) -> None:
    """Revoke an API key; requests with it fail from now on."""
    from core.identity import revoke_key

    with _admin_session() as db:
        revoke_key(db, key_id)
    print(f"{key_id} revoked")
