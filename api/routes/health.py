"""Liveness for load balancers and `tuneq up`: the API is useful only if DB and Redis answer."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep
from api.schemas import Health

router = APIRouter(tags=["health"])


def _check_db(db: SessionDep) -> str:
    try:
        db.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is "down"; the reason is reported
        return f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]


def _check_redis(url: str) -> str:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]


@router.get("/healthz", responses={503: {"model": Health}})
def healthz(db: SessionDep, settings: SettingsDep) -> Health:
    health = Health(status="ok", database=_check_db(db), redis=_check_redis(settings.redis_url))
    if health.database != "ok" or health.redis != "ok":
        health.status = "error"
        return JSONResponse(health.model_dump(), status_code=503)  # type: ignore[return-value]
    return health
