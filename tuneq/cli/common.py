"""What every command shares: the consoles, one-line errors, the API client."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from tuneq import config
from tuneq.client import APIError, Client, TuneqError

F = TypeVar("F", bound=Callable[..., Any])

out = Console()
err = Console(stderr=True, soft_wrap=True)


class OneLineErrors(TyperGroup):
    """Usage errors as one `error: ...` line instead of a framed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN201
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's usage errors, vendored by typer
            if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
                typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            rv = exc.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(code)


def friendly(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.TyperException, typer.Abort):
            raise
        except APIError as exc:
            where = f" ({exc.param})" if exc.param and exc.param not in str(exc) else ""
            raise fail(f"{exc}{where}") from None
        except (TuneqError, config.ConfigError) as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except OSError as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the user gets one line; the detail is the type
            raise fail(f"unexpected {type(exc).__name__}: {exc}") from None

    return wrapper  # type: ignore[return-value]


def client() -> Client:
    # Looked up on the package at each call, so that tests can point tuneq.cli.make_client at an app.
    from tuneq import cli

    return cli.make_client()


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))
