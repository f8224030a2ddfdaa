"""The cluster as the workers' registry sees it: hosts, their GPUs and disks."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import CurrentUser
from core import workers

router = APIRouter(prefix="/v1/hosts", tags=["hosts"])


@router.get("")
def list_hosts(user: CurrentUser) -> dict[str, Any]:
    return {"object": "list", "data": workers.hosts(), "has_more": False}
