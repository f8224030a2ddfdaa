"""The event hub's read: every watched job's new events in two queries, however many jobs."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from tests.integration.conftest import make_job

pytestmark = pytest.mark.dialects


def test_poll_many_reads_every_feed_in_two_queries_and_as_each_feed_alone_would(db: Session) -> None:
    from core import states
    from core.db import get_engine, read_session
    from core.event_feed import EventFeed, poll_many
    from core.models import Job, JobEvent

    jobs = [make_job(db) for _ in range(3)]
    for n, job in enumerate(jobs):
        for i in range(n * 2):
            states.add_event(db, job, f"step {i}", type="metrics", data={"i": i})
    db.commit()
    with read_session() as s:
        seqs = {j.id: list(s.scalars(select(JobEvent.seq).where(JobEvent.job_id == j.id).order_by(JobEvent.seq)))
                for j in jobs}
    # Feeds from the start of each job, one from its second event on, and one of a job that is gone.
    starts = {jobs[0].id: 0, jobs[1].id: 0, jobs[2].id: seqs[jobs[2].id][1]}
    together = [EventFeed(j, after) for j, after in starts.items()] + [EventFeed("ftjob-gone", 0)]
    alone = [EventFeed(j, after) for j, after in starts.items()] + [EventFeed("ftjob-gone", 0)]

    statements: list[str] = []
    listener = lambda *a: statements.append(a[2])  # noqa: E731
    event.listen(get_engine(), "before_cursor_execute", listener)
    try:
        with read_session() as s:
            got = poll_many(s, together)
    finally:
        event.remove(get_engine(), "before_cursor_execute", listener)
    assert len(statements) == 2, statements
    with read_session() as s:
        want = [f.poll(s) for f in alone]
    assert [([e.seq for e in evs], st) for evs, st in got] == [([e.seq for e in evs], st) for evs, st in want]
    assert [len(evs) for evs, _ in got] == [len(seqs[jobs[0].id]), len(seqs[jobs[1].id]), len(seqs[jobs[2].id]) - 2, 0]
    assert [st for _, st in got] == [states.QUEUED] * 3 + [None]

    # Nothing new: nothing again; a new event of one job: that one alone.
    with read_session() as s:
        assert [evs for evs, _ in poll_many(s, together)] == [[], [], [], []]
    states.add_event(db, db.get(Job, jobs[1].id), "later", type="metrics")
    db.commit()
    with read_session() as s:
        assert [[e.message for e in evs] for evs, _ in poll_many(s, together)] == [[], ["later"], [], []]


def test_streams_that_join_together_share_one_catch_up_read(db: Session) -> None:
    """Streams opened together (a page of them, clients reconnecting after a restart) start from
    the same cursor: the hub's read gives them their catch-up with one query, not one each."""
    from api.event_hub import Channel, EventHub, Watcher
    from core import states
    from core.db import get_engine, read_session
    from core.event_feed import EventFeed

    job = make_job(db)
    for i in range(3):
        states.add_event(db, job, f"step {i}", type="metrics", data={"i": i})
    db.commit()
    ch = Channel(EventFeed(job.id, 0))
    with read_session() as s:
        handed_out = [ev.id for ev in ch.feed.poll(s)[0]]  # by an earlier stream of the job
    joined = [Watcher(job.id, start=0, cursor=0) for _ in range(10)]
    hub = EventHub(render=lambda ev: ev.id.encode())

    statements: list[str] = []
    listener = lambda *a: statements.append(a[2])  # noqa: E731
    event.listen(get_engine(), "before_cursor_execute", listener)
    try:
        [(_, fresh, _, catchups)] = hub._read([(ch, joined)])
    finally:
        event.remove(get_engine(), "before_cursor_execute", listener)
    assert len(statements) == 3, statements  # the statuses, the new events, one catch-up
    assert fresh == []
    assert [[ev_id for _, ev_id, _ in catchups[w]] for w in joined] == [handed_out] * len(joined)
