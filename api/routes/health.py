"""Liveness and readiness for load balancers and `tuneq up`.

/healthz: the API is useful only if DB and Redis answer. /readyz: a job created now would wait on
no warm-up: the API's own (done before it answers at all, api.warmup), its checking child's
(api.validation), and with ?workers=N, that many registered workers, each with its standby
trainers done importing (worker.standby). A worker that runs jobs has fewer standbys ready, so a
load balancer's probe leaves workers out.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import SessionDep, SettingsDep
from api import validation, warmup
from api.schemas import Health, Readiness
from core import workers as registry

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


def _workers_state(wanted: int) -> dict[str, Any]:
    """Registered workers, those whose standbys, trainer template and kernels are all ready, the
    standbys, the templates still importing, the kernel warm-ups still running, a registry error."""
    out: dict[str, Any] = {"workers": 0, "workers_ready": 0, "standbys_wanted": 0, "standbys_ready": 0,
                           "templates_importing": 0, "kernels_warming": 0}
    if not wanted:
        return out
    try:
        entries = registry.registered()
    except Exception as exc:  # noqa: BLE001 - not ready, and why
        return {**out, "registry": f"error: {type(exc).__name__}: {exc}".splitlines()[0][:300]}
    for w in entries:
        standby = w.get("standby") or {}
        out["workers"] += 1
        importing = w.get("template") == "importing"
        warming = w.get("kernels") == "warming"
        out["templates_importing"] += importing
        out["kernels_warming"] += warming
        out["workers_ready"] += standby.get("ready", 0) >= standby.get("wanted", 0) and not importing and not warming
        out["standbys_wanted"] += standby.get("wanted", 0)
        out["standbys_ready"] += min(standby.get("ready", 0), standby.get("wanted", 0))
    return out


@router.get("/readyz", responses={503: {"model": Readiness}})
def readyz(workers: int = Query(0, ge=0, le=1000, description="Registered workers needed, each with its standby trainers, trainer template and kernel warm-up ready.")) -> Readiness:
    child = validation.child_state()
    pool = _workers_state(workers)
    waiting = []
    if not warmup.DONE.is_set():
        waiting.append("api")
    if child == "warming":
        waiting.append("checking_child")
    if workers and (pool.get("registry") or pool["workers"] < workers or pool["workers_ready"] < pool["workers"]):
        waiting.append("workers")
    out = Readiness(status="ready" if not waiting else "starting", waiting_on=waiting, checking_child=child,
                    api_warmup_s=warmup.TIMES.get("api_s"), **pool)
    if waiting:
        return JSONResponse(out.model_dump(), status_code=503)  # type: ignore[return-value]
    return out
