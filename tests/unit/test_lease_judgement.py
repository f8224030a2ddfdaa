"""Leases are judged stale only when their holders missed renewals while the database was up.

During a database outage no worker can renew its lease; right after the database is back every
live lease looks old. The reaper (and a delivery taking over a stale lease) must wait until this
process has seen the database up, without a break, for a whole TTL (worker.reaper)."""

from __future__ import annotations

import threading
from contextlib import nullcontext
from types import SimpleNamespace

import pytest

from worker import placement, reaper, runner

TTL = 60.0


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def watch_up_for(seconds: float, clock: Clock, watch: reaper.DatabaseWatch | None = None,
                 every: float = 5.0) -> reaper.DatabaseWatch:
    """`watch` (a new one by default) contacts the database every `every` s for `seconds`."""
    watch = watch or reaper.DatabaseWatch(clock)
    end = clock.t + seconds
    while True:
        watch.saw_up(reaper.max_gap(TTL))
        if clock.t >= end:
            return watch
        clock.t = min(end, clock.t + every)


def test_a_fresh_watch_judges_nothing_until_it_has_seen_the_database_up_for_a_ttl() -> None:
    clock = Clock()
    watch = reaper.DatabaseWatch(clock)
    assert not watch.may_judge_leases(TTL)
    watch = watch_up_for(TTL - 5, clock)
    assert not watch.may_judge_leases(TTL)
    clock.t += 5
    watch.saw_up(reaper.max_gap(TTL))
    assert watch.may_judge_leases(TTL)


def test_an_outage_starts_the_wait_again_from_the_moment_the_database_is_back() -> None:
    clock = Clock()
    watch = watch_up_for(10 * TTL, clock)
    assert watch.may_judge_leases(TTL)
    watch.saw_down()
    assert not watch.may_judge_leases(TTL)
    clock.t += 3 * TTL  # down for three TTLs: every lease is old now
    watch_up_for(TTL - 5, clock, watch)
    assert not watch.may_judge_leases(TTL)
    watch_up_for(5, clock, watch)
    assert watch.may_judge_leases(TTL)


def test_an_unwatched_stretch_counts_as_an_outage() -> None:
    """A watcher starved or suspended for longer than the gap could not have seen an outage."""
    clock = Clock()
    watch = watch_up_for(10 * TTL, clock)
    clock.t += reaper.max_gap(TTL) + 1
    assert not watch.may_judge_leases(TTL)  # no contact for too long
    watch.saw_up(reaper.max_gap(TTL))
    assert not watch.may_judge_leases(TTL)  # and the count starts again at this contact
    assert watch.up_for(reaper.max_gap(TTL)) == 0.0


def test_reap_once_leaves_every_lease_alone_until_the_database_was_seen_up_for_a_ttl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQ_LEASE_TTL_S", str(TTL))
    from core.settings import get_settings
    get_settings.cache_clear()
    judged: list[float] = []
    monkeypatch.setattr(reaper, "session_scope", lambda: nullcontext(None))
    monkeypatch.setattr(reaper, "reap_stale", lambda db, ttl: judged.append(ttl) or ["ftjob-a"])
    monkeypatch.setattr(reaper, "enqueue_job", lambda job_id: None)
    clock = Clock()
    try:
        just_back = watch_up_for(1.0, clock)
        assert reaper.reap_once(just_back) == [] and judged == []
        assert reaper.reap_once(watch_up_for(TTL, clock)) == ["ftjob-a"] and judged == [TTL]
    finally:
        get_settings.cache_clear()


def test_a_failed_reap_pass_counts_as_an_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEQ_LEASE_TTL_S", str(TTL))
    from core.settings import get_settings
    get_settings.cache_clear()

    def down() -> None:
        raise ConnectionError("the database went away")

    monkeypatch.setattr(reaper, "session_scope", down)
    clock = Clock()
    watch = watch_up_for(2 * TTL, clock)
    try:
        with pytest.raises(ConnectionError):
            reaper.reap_once(watch)
    finally:
        get_settings.cache_clear()
    assert not watch.may_judge_leases(TTL)


def test_a_delivery_takes_over_a_running_job_only_when_leases_may_be_judged() -> None:
    old = SimpleNamespace(status="running", lease_heartbeat_at=0.0)
    assert placement._runnable(old, TTL)
    assert not placement._runnable(old, None)
    assert placement._runnable(SimpleNamespace(status="queued", lease_heartbeat_at=None), None)


def test_the_keeper_retries_a_failed_renewal_soon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the database is back the lease is renewed within RETRY_S, not a whole period later."""
    results = iter([RuntimeError("database restarting"), object(), None])

    def heartbeat(db, job_id, worker_id, attempt):  # noqa: ANN001, ANN202
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    monkeypatch.setattr(runner, "heartbeat", heartbeat)
    monkeypatch.setattr(runner, "get_sessionmaker", lambda: nullcontext)
    keeper = runner.LeaseKeeper("ftjob-x", "w", 1, every_s=30.0)
    waits: list[float] = []

    class Stop:
        def wait(self, timeout: float) -> bool:
            waits.append(timeout)
            return False

        def is_set(self) -> bool:
            return False

    keeper.stop = Stop()  # type: ignore[assignment]
    keeper._beat()  # runs until the third renewal reports the lease lost
    assert waits == [30.0, keeper.RETRY_S, 30.0]
    assert keeper.beats == 1 and keeper.lost.is_set()


def test_a_run_handed_its_own_job_again_stops_the_earlier_attempt_first() -> None:
    """Attempt 2 on the worker still running attempt 1: attempt 1 is told its lease is gone and
    attempt 2 goes on only once attempt 1 has ended (one trainer per job at a time)."""
    lost, done = threading.Event(), threading.Event()
    earlier = SimpleNamespace(job_id="ftjob-x", attempt=1, keeper=SimpleNamespace(lost=lost), done=done)
    later = SimpleNamespace(job_id="ftjob-x", attempt=2)
    runs = runner.Runs()
    assert runs.enter(earlier) is None  # type: ignore[arg-type]
    assert runs.enter(later) is earlier  # type: ignore[arg-type]

    order: list[str] = []

    def earlier_run() -> None:
        lost.wait(10)
        order.append("attempt 1 stopped its trainer")
        done.set()

    t = threading.Thread(target=earlier_run)
    t.start()
    assert runner.supersede(earlier, wait_s=10)  # type: ignore[arg-type]
    order.append("attempt 2 starts")
    t.join(10)
    assert order == ["attempt 1 stopped its trainer", "attempt 2 starts"]
    runs.leave(earlier)  # type: ignore[arg-type]
    assert runs.by_job == {"ftjob-x": later}  # the earlier run's end does not unregister the later one
    runs.leave(later)  # type: ignore[arg-type]
    assert runs.by_job == {}
