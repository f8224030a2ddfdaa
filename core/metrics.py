"""Prometheus figures of the whole service, read from the database and Redis when scraped.

Nothing is counted in the API process: several API processes (or hosts) answer /metrics, and
each must report the same totals, so every figure is a query at scrape time. A scrape is a
handful of aggregate queries, cheap at Prometheus' usual 15-60 s interval.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import case, func, select

from core import states, workers
from core.db import session_scope
from core.models import GangMember, Job

log = logging.getLogger(__name__)

STATUSES = (states.VALIDATING, states.QUEUED, states.RUNNING, states.PAUSED, states.CANCELLING, *sorted(states.TERMINAL))
# Job run times (started -> finished, queue time excluded) span minutes to days.
DURATION_BUCKETS_S = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 72 * 3600)
# Statuses in which a job holds GPUs on its worker.
HOLDING_GPUS = (states.RUNNING, states.CANCELLING)


class ServiceCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        with session_scope() as db:
            by_status = dict(db.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            busy = db.execute(
                select(Job.lease_owner, func.sum(Job.gpus)).where(Job.status.in_(HOLDING_GPUS), Job.lease_owner.is_not(None))
                .group_by(Job.lease_owner)
            ).all()
            # A job across hosts holds `gpus` on each host: its followers' workers hold theirs.
            followers = db.execute(
                select(GangMember.worker_id, func.sum(GangMember.gpus)).join(Job, Job.id == GangMember.job_id)
                .where(Job.status.in_(HOLDING_GPUS), GangMember.node_rank > 0, GangMember.worker_id.is_not(None))
                .group_by(GangMember.worker_id)
            ).all()
            duration = Job.finished_at - Job.started_at
            durations = db.execute(
                select(Job.status, func.count(), func.sum(duration),
                       *(func.sum(case((duration <= b, 1), else_=0)) for b in DURATION_BUCKETS_S))
                .where(Job.status.in_(states.TERMINAL), Job.started_at.is_not(None), Job.finished_at.is_not(None))
                .group_by(Job.status)
            ).all()
            # `tokens` of the latest metrics event: input tokens seen, counted on from a checkpoint on resume.
            tokens = db.scalar(select(func.sum(Job.metrics["tokens"].as_float())))

        jobs = GaugeMetricFamily("tuneq_jobs", "Jobs by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("tuneq_queue_depth", "Jobs waiting in the queue (status queued).",
                                value=by_status.get(states.QUEUED, 0))

        hist = HistogramMetricFamily("tuneq_job_duration_seconds", "Run time of finished jobs, from start to end "
                                     "(queue time excluded).", labels=["status"])
        for status, count, total, *cumulative in durations:
            buckets = [(str(float(b)), int(n or 0)) for b, n in zip(DURATION_BUCKETS_S, cumulative)]
            hist.add_metric([status], buckets + [("+Inf", int(count))], float(total or 0))
        yield hist

        yield CounterMetricFamily("tuneq_tokens_trained", "Input tokens the trainers processed, over all jobs.",
                                  value=float(tokens or 0))

        held: dict[str, int] = {}
        for owner, n in (*busy, *followers):
            held[owner] = held.get(owner, 0) + int(n or 0)
        yield from self._workers(held)

    def _workers(self, busy: dict[str, int]) -> Iterator[Metric]:
        up = GaugeMetricFamily("tuneq_redis_up", "1 if the worker registry in Redis answered this scrape.")
        try:
            registered = workers.registered()
            up.add_metric([], 1)
        except redis.RedisError as exc:
            log.warning("metrics: the worker registry is unreachable: %s", exc)
            registered = []
            up.add_metric([], 0)
        yield up
        yield GaugeMetricFamily("tuneq_workers", "Workers registered (alive) now.", value=len(registered))
        gpus = GaugeMetricFamily("tuneq_worker_gpus", "GPUs (on a CPU host: job slots) of each worker's host.",
                                 labels=["worker", "host", "kind"])
        used = GaugeMetricFamily("tuneq_worker_gpus_busy", "GPUs held by the jobs each worker runs.",
                                 labels=["worker", "host"])
        hosts = {}
        for w in sorted(registered, key=lambda w: str(w.get("worker_id"))):
            wid, host = str(w.get("worker_id")), str(w.get("host", ""))
            hosts[wid] = host
            gpus.add_metric([wid, host, str(w.get("kind", ""))], int(w.get("gpus") or 0))
        # A lease whose worker is no longer registered still holds its GPUs until the reaper acts.
        for wid in sorted(set(hosts) | set(busy)):
            used.add_metric([wid, hosts.get(wid, "")], busy.get(wid, 0))
        yield gpus
        yield used


def make_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServiceCollector())
    return registry
