"""Prometheus metrics of the whole service (core/metrics.py), for admins.

The figures cover every team's jobs and name the worker hosts, so /metrics needs an admin's key
like the other service-wide routes; Prometheus sends it with `authorization: {credentials_file: ...}`
in its scrape config (README, Operations).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import AdminUser
from core.metrics import make_registry

router = APIRouter(tags=["operations"])

REGISTRY = make_registry()


@router.get("/metrics", response_class=Response,
            responses={200: {"description": "Prometheus text format.", "content": {CONTENT_TYPE_LATEST: {}}}})
def prometheus_metrics(admin: AdminUser) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
