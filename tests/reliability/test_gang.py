"""Jobs across hosts on this machine: workers with their own TUNEQ_HOST_ID and one CPU "GPU" each
train one job as two ranks over gloo (torch.distributed.run, the leader's rendezvous), sharing the
S3 store (moto), PostgreSQL and Redis, as test_two_hosts.py sets them up."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import states
from core.db import session_scope
from core.jobs import request_cancel
from core.models import Checkpoint, GangMember, Job
from core.queue import enqueue_job
from tests.reliability.conftest import IDLE_STEPS, STEADY_LEASE, events_of, job_status, make_job, trainer_starts, wait_for
from tests.reliability.test_two_hosts import host, last_step, losses, s3, stored_checkpoints, wait_end  # noqa: F401
from worker.process import trainer_pids

STEPS = 8
GLOBAL_BATCH = 4
LOSS_RTOL = 1e-5
# Members must notice a lost host within seconds, and give up on one that never comes.
GANG = {"TUNEQ_GANG_JOIN_TIMEOUT_S": "20", "OMP_NUM_THREADS": "1"}


def job(db: Session, env: dict[str, str], nodes: int, steps: int = STEPS, **extra: Any) -> Job:
    """Each of `nodes` ranks takes GLOBAL_BATCH / nodes examples a step: one global batch throughout."""
    hp = {"max_steps": steps, "batch_size": GLOBAL_BATCH // nodes, "max_seq_len": 32, "warmup_steps": 0,
          "learning_rate": 3e-3}
    return make_job(db, env["model"], examples=64, hyperparameters=hp, nodes=nodes, **extra)


def gang_hosts(job_id: str) -> list[list[str]]:
    """Per run of the trainer: the leader's host, then the hosts that started a part of it."""
    runs: list[list[str]] = []
    for e in events_of(job_id, "message"):
        if e.data and "pid" in e.data:
            runs.append([e.data["host"]])
        elif e.data and "gang_host" in e.data and runs:
            runs[-1].append(e.data["gang_host"])
    return runs


def no_gang_left(db: Session) -> bool:
    db.expire_all()
    rows = list(db.scalars(select(GangMember)))
    db.rollback()
    return not rows


def test_two_hosts_train_one_job_as_two_ranks_like_one_process_and_two_such_jobs_both_finish(
        db: Session, rel_env, workers, s3, tmp_path: Path) -> None:
    a = host(workers, tmp_path, s3, "host-a", **STEADY_LEASE, **GANG)
    b = host(workers, tmp_path, s3, "host-b", **STEADY_LEASE, **GANG)
    # Two jobs that each need both hosts, submitted at once: whichever forms its gang first holds
    # both hosts, the other holds nothing meanwhile, then runs.
    g1, g2 = job(db, rel_env, nodes=2), job(db, rel_env, nodes=2)
    enqueue_job(g1.id)
    enqueue_job(g2.id)
    reference = job(db, rel_env, nodes=1)  # one process with the same global batch
    enqueue_job(reference.id)
    for j in (g1, g2, reference):
        assert wait_end(j.id, a, 300) == states.SUCCEEDED, f"{j.id}\n{a.log()}\n{b.log()}"
    for j in (g1, g2):
        runs = gang_hosts(j.id)
        # A host whose worker took its GPU for another job just as the gang formed ends that attempt
        # without a retry counted; the job then runs once both hosts are free.
        assert sorted(runs[-1]) == ["host-a", "host-b"] and all(len(r) == 1 for r in runs[:-1]), runs
        events = events_of(j.id)
        # On a failure, every event whole and both hosts' logs, so that a retry can be explained.
        assert not any(e.type == "retry" for e in events), (
            "\n".join(f"{e.type}: {e.message}" for e in events) + f"\n{a.log()}\n{b.log()}")
        # Events come from rank 0 alone: one start, one metrics event per step.
        assert len(events_of(j.id, "start")) == 1
        got, want = losses(j.id), losses(reference.id)
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=LOSS_RTOL), f"{j.id} step {step}: {got[step]} != {want[step]}"
    # The two gangs never overlapped: the second ran once the first had ended and freed its hosts.
    first, second = sorted((g1, g2), key=lambda j: trainer_starts(j.id)[-1].created_at)
    ended = next(e.created_at for e in events_of(first.id, "status") if e.data and e.data.get("to") == states.SUCCEEDED)
    assert trainer_starts(second.id)[-1].created_at >= ended
    assert wait_for(lambda: no_gang_left(db), 30, "the gangs' rows to go")
    db.expire_all()
    assert set(db.get(Job, g1.id).metrics["peak_memory_bytes_by_host"]) == {"host-a", "host-b"}
    # A pause, resume and cancel on both hosts: the preemption test below.


def test_a_killed_follower_host_stops_every_rank_and_the_job_resumes_from_the_store(
        db: Session, rel_env, workers, s3, tmp_path: Path) -> None:
    steps, period = 40, 10
    # A lease of 15 s: the lost host is found by the failed collective (or its silence), and a
    # worker stalled on this loaded machine is not taken for a dead one.
    a = host(workers, tmp_path, s3, "host-a", TUNEQ_LEASE_TTL_S="15", **GANG)
    b = host(workers, tmp_path, s3, "host-b", TUNEQ_LEASE_TTL_S="15", **GANG)
    g = job(db, rel_env, nodes=2, steps=steps,
            schedule={"log_every_steps": 1, "checkpoint_every_steps": period, "keep_checkpoints": 10})
    enqueue_job(g.id)
    runs = wait_for(lambda: [r for r in gang_hosts(g.id) if len(r) == 2], 180,
                    lambda: f"both hosts to start\n{a.log()}\n{b.log()}")
    leader, follower = runs[0]
    procs = {"host-a": a, "host-b": b}
    leader_dir, follower_dir = (tmp_path / h / "work" / g.id for h in (leader, follower))
    # Hold rank 0 past its second checkpoint, so the kill lands mid-run with checkpoints stored.
    wait_for(lambda: last_step(leader_dir / "events.jsonl") > period + 2, 300,
             lambda: f"step {period + 3}\n{procs[leader].log()}", interval=0.01)
    frozen = trainer_pids(leader_dir)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    assert last_step(leader_dir / "events.jsonl") < steps, "the job ended before it could be stopped"
    wait_for(lambda: [c for c in stored_checkpoints(db, g.id) if c.uploaded_at and c.step >= period], 120,
             lambda: f"a stored checkpoint\n{procs[leader].log()}")
    wait_for(lambda: all(c.uploaded_at for c in stored_checkpoints(db, g.id)), 60, "the uploads to finish")
    # The follower host dies whole: its worker and its ranks.
    ranks = trainer_pids(follower_dir)
    assert ranks, "no trainer runs on the follower"
    procs[follower].kill()
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in frozen:
        os.kill(pid, signal.SIGCONT)
    newest = max(c.step for c in stored_checkpoints(db, g.id) if c.uploaded_at)
    # Every rank stops and the job goes back to the queue as a retry.
    wait_for(lambda: any(e.type == "retry" for e in events_of(g.id)), 120,
             lambda: f"the job to be retried\n{procs[leader].log()}")
    wait_for(lambda: not trainer_pids(leader_dir), 60, "the leader's ranks to stop")
    c = host(workers, tmp_path, s3, "host-c", TUNEQ_LEASE_TTL_S="15", **GANG)  # a host to take the lost one's place
    assert wait_end(g.id, c, 300) == states.SUCCEEDED, f"{procs[leader].log()}\n{c.log()}"
    runs = gang_hosts(g.id)
    assert sorted(runs[-1]) == sorted([leader, "host-c"]), runs
    resumed = [e.data.get("resumed_from_step") for e in events_of(g.id, "start")]
    # From the store, and at least from what it held at the kill: on a loaded machine rank 0 may
    # have passed the next checkpoint before it was stopped, which the worker then stores as well.
    stored = {c.step for c in stored_checkpoints(db, g.id) if c.uploaded_at}
    assert resumed[0] is None and resumed[-1] >= newest and resumed[-1] in stored, (resumed, newest, stored)
    assert sorted(losses(g.id)) == list(range(1, steps + 1))
    assert wait_for(lambda: no_gang_left(db), 30, "the gang's rows to go")
    assert job_status(g.id) == states.SUCCEEDED


def test_a_running_gang_is_preempted_by_a_higher_gang_on_both_hosts_and_resumes_there_from_its_checkpoint(
        db: Session, rel_env, workers, s3, tmp_path: Path) -> None:
    env = {**STEADY_LEASE, **GANG, **IDLE_STEPS}
    a = host(workers, tmp_path, s3, "host-a", **env)
    b = host(workers, tmp_path, s3, "host-b", **env)
    logs = lambda: f"{a.log()}\n{b.log()}"  # noqa: E731
    low = job(db, rel_env, nodes=2, steps=2000)
    enqueue_job(low.id)
    first = wait_for(lambda: [r for r in gang_hosts(low.id) if len(r) == 2], 120,
                     lambda: f"the low job's ranks\n{logs()}")[0]
    dirs = [tmp_path / h / "work" / low.id for h in ("host-a", "host-b")]
    wait_for(lambda: last_step(tmp_path / first[0] / "work" / low.id / "events.jsonl") > 0, 120,
             "its first step (a pause checkpoints from then on)")
    # A job of higher priority that needs both hosts claims them and pauses the low one, as one job:
    # its ranks on both hosts checkpoint and stop, and it goes back to the queue, no retry counted.
    high = prioritised(job(db, rel_env, nodes=2, steps=2000), 5)
    enqueue_job(high.id)
    wait_for(lambda: [r for r in gang_hosts(high.id) if len(r) == 2], 120, lambda: f"the high job's ranks\n{logs()}")
    assert [e.data["for_job"] for e in events_of(low.id, "preempted")] == [high.id]
    assert job_status(low.id) == states.QUEUED
    wait_for(lambda: not any(trainer_pids(d) for d in dirs), 30, "every host's ranks to stop")
    # The high job ends (cancelled as soon as it runs on both hosts: how it ends does not matter).
    request_cancel(db, db.get(Job, high.id))
    db.commit()
    preempted = events_of(low.id, "preempted")[0]
    paused_at = next(e.data["step"] for e in events_of(low.id, "checkpoint") if e.seq > preempted.seq)  # the pause's
    # Then it resumes on both hosts from that checkpoint (each host's start says so as it spawns).
    again = wait_for(lambda: [r for r in gang_hosts(low.id) if len(r) == 2][1:], 120,
                     lambda: f"both hosts to start again\n{logs()}")[0]
    assert sorted(again) == ["host-a", "host-b"]
    spawned = [e.data for e in events_of(low.id, "message") if e.data and ("pid" in e.data or "gang_host" in e.data)]
    resumed = [d["resume"] for d in spawned if d["attempt"] == spawned[-1]["attempt"]]
    assert resumed == [True, True], spawned
    with session_scope() as s:
        leader = s.scalar(select(GangMember).where(GangMember.job_id == low.id, GangMember.node_rank == 0))
        assert leader is not None and s.get(Checkpoint, leader.resume_checkpoint).step == paused_at
    assert not any(e.type == "retry" for e in events_of(low.id)), [e.message for e in events_of(low.id)]
    # A cancel reaches the ranks on both hosts.
    wait_for(lambda: all(trainer_pids(d) for d in dirs), 60, "the ranks on both hosts")
    request_cancel(db, db.get(Job, low.id))
    db.commit()
    wait_for(lambda: job_status(low.id) == states.CANCELLED, 60, lambda: f"the cancel\n{logs()}")
    wait_for(lambda: not any(trainer_pids(d) for d in dirs), 30, "every host's ranks to stop")
    assert wait_for(lambda: no_gang_left(db), 30, "the gang's rows to go")


def prioritised(j: Job, priority: int) -> Job:
    with session_scope() as s:
        s.get(Job, j.id).priority = priority
    return j
