"""Which workers are alive and how many GPUs each host has: Redis keys with a TTL, no DB schema.

A worker refreshes its key on every heartbeat; a dead one simply expires. The API reads the keys
to refuse a job that no registered host could ever run.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

import redis

from core.settings import get_settings

PREFIX = "tuneq:worker:"


@lru_cache
def client() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=2, socket_timeout=5)


def register(worker_id: str, host: str, gpus: int, kind: str, ttl_s: float, **extra: Any) -> None:
    info = {"worker_id": worker_id, "host": host, "gpus": gpus, "kind": kind, **extra}
    client().set(PREFIX + worker_id, json.dumps(info), ex=max(1, math.ceil(ttl_s)))


def unregister(worker_id: str) -> None:
    client().delete(PREFIX + worker_id)


def registered() -> list[dict[str, Any]]:
    out = []
    for key in client().scan_iter(PREFIX + "*", count=100):
        raw = client().get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def hosts() -> list[dict[str, Any]]:
    """One entry per registered host: its devices and GPUs, free ones, its workers, its disk."""
    by_host: dict[str, dict[str, Any]] = {}
    for w in sorted(registered(), key=lambda w: str(w.get("worker_id"))):
        h = by_host.setdefault(w["host"], {"host": w["host"], "kind": w.get("kind"), "gpus": 0, "free": 0,
                                           "gpu_info": [], "workers": [], "disk_full": False, "disk_free_gib": None})
        h["gpus"] = max(h["gpus"], int(w["gpus"]))
        h["free"] = max(h["free"], int(w.get("free") or 0))  # the workers of a host share its GPUs
        h["gpu_info"] = h["gpu_info"] or w.get("gpu_info") or []
        h["workers"].append(w.get("worker_id"))
        h["disk_full"] = h["disk_full"] or bool(w.get("disk_full"))
        h["disk_free_gib"] = w.get("disk_free_gib", h["disk_free_gib"])
    return [by_host[k] for k in sorted(by_host)]


def largest_host() -> int | None:
    """GPUs of the biggest registered host, or None when no worker is registered (yet)."""
    hosts: dict[str, int] = {}
    for w in registered():
        hosts[w["host"]] = max(hosts.get(w["host"], 0), int(w["gpus"]))
    return max(hosts.values()) if hosts else None


def total_devices() -> int:
    hosts: dict[str, int] = {}
    for w in registered():
        hosts[w["host"]] = max(hosts.get(w["host"], 0), int(w["gpus"]))
    return sum(hosts.values())


def gpu_memory_gib(gpu_info: list[dict[str, Any]]) -> float | None:
    """Memory of a host's smallest GPU (a job may get any of them); None when not reported."""
    sizes = [float(g["memory_gib"]) for g in gpu_info if isinstance(g.get("memory_gib"), int | float)]
    return min(sizes) if sizes else None


def largest_gpu_memory(gpus: int = 1) -> float | None:
    """GiB of the largest GPU on a registered host with at least `gpus` GPUs; None when no such
    host reports its GPUs' memory (then a plan falls back to TUNEQ_PLAN_GPU_MEMORY_GIB)."""
    sizes = [m for h in hosts() if h["gpus"] >= gpus and (m := gpu_memory_gib(h["gpu_info"])) is not None]
    return max(sizes) if sizes else None
