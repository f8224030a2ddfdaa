"""Cursor pages, OpenAI style: `after` is the id of the last item the client has seen.

Keyset pagination (not OFFSET) so a page stays correct while new jobs and events arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Query

from api.errors import bad_request
from api.schemas import Page
from core.settings import Settings

T = TypeVar("T")

DEFAULT_LIMIT = 20

# OpenAI's largest `limit` (its files list's; it names none larger for any list). Above it, or
# below 1, a limit is the client's error.
MAX_LIMIT = 10_000
LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=(
    "Items per page. Above the server's page size (TUNEQ_PAGE_LIMIT_MAX) the page holds that many, "
    "with has_more set when there are more."))]
AfterQuery = Annotated[str | None, Query(description="Id of the last item of the previous page.")]


def page_size(limit: int, settings: Settings) -> int:
    """The rows a page of `limit` holds: a limit OpenAI allows but over this server's page size is
    served as a full page with has_more, which clients (the SDK's auto-paging included) follow
    with `after`, rather than refused."""
    if limit < 1 or limit > MAX_LIMIT:
        raise bad_request(f"limit: must be between 1 and {MAX_LIMIT}, got {limit}", "limit")
    return min(limit, settings.page_limit_max)


def make_page(rows: Sequence[Any], limit: int, to_out: Callable[[Any], T]) -> Page[T]:
    """`rows` was fetched with limit + 1, so one extra row means there is a next page."""
    items = [to_out(r) for r in rows[:limit]]
    return Page[T](
        data=items,
        has_more=len(rows) > limit,
        first_id=getattr(items[0], "id", None) if items else None,
        last_id=getattr(items[-1], "id", None) if items else None,
    )
