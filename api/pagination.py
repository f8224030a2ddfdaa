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

# The static bound documents a range for clients and fuzzers; check_limit applies the configured one.
LimitQuery = Annotated[int, Query(ge=1, le=10_000, description="Items per page (at most TUNEQ_PAGE_LIMIT_MAX).")]
AfterQuery = Annotated[str | None, Query(description="Id of the last item of the previous page.")]


def check_limit(limit: int, settings: Settings) -> int:
    if limit < 1 or limit > settings.page_limit_max:
        raise bad_request(f"limit: must be between 1 and {settings.page_limit_max}, got {limit}", "limit")
    return limit


def make_page(rows: Sequence[Any], limit: int, to_out: Callable[[Any], T]) -> Page[T]:
    """`rows` was fetched with limit + 1, so one extra row means there is a next page."""
    items = [to_out(r) for r in rows[:limit]]
    return Page[T](
        data=items,
        has_more=len(rows) > limit,
        first_id=getattr(items[0], "id", None) if items else None,
        last_id=getattr(items[-1], "id", None) if items else None,
    )
