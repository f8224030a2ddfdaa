"""The lease keeper outlives a failed heartbeat of any kind: a keeper thread that died would stop
renewing the lease, and the reaper would take a running job from a live worker."""

from __future__ import annotations

import time
from contextlib import nullcontext

import pytest

from worker import runner


def test_a_heartbeat_that_raises_does_not_stop_the_keeper(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}

    def heartbeat(db, job_id, worker_id, attempt):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("not a driver error")
        return object()

    monkeypatch.setattr(runner, "heartbeat", heartbeat)
    monkeypatch.setattr(runner, "get_sessionmaker", lambda: nullcontext)
    with runner.LeaseKeeper("ftjob-x", "w", 1, every_s=0.01) as keeper:
        deadline = time.monotonic() + 10
        while keeper.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert keeper.beats >= 2 and not keeper.lost.is_set()
