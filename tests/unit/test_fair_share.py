"""Fair share's queue order, without services: least-used team, then user; FIFO within a user."""

from __future__ import annotations

from core.fairshare import decayed, order, team_key, user_key
from core.scheduling import Waiting

PER_GPU = 1.0  # GPU-hours a job ordered ahead counts for (the setting's default)


def job(id: str, owner: str, team: str | None, created: float, gpus: int = 1, priority: int = 0) -> Waiting:
    return Waiting(id, gpus, priority, 0.0, owner, team_key(team, owner), created)


def ids(queue: list[Waiting]) -> list[str]:
    return [w.id for w in queue]


def test_a_colleagues_single_job_is_not_starved_by_500_queued_jobs() -> None:
    flood = [job(f"a{i}", "alice", "vision", created=float(i)) for i in range(500)]
    late = job("b0", "bob", "vision", created=1000.0)  # queued after all of alice's
    queue = order([*flood, late], {}, PER_GPU)
    assert ids(queue)[:2] == ["a0", "b0"]  # bob's waits behind one of alice's, not 500
    # Alice has used GPUs lately and bob has not: bob's job goes first.
    queue = order([*flood, late], {user_key("alice"): 10.0}, PER_GPU)
    assert ids(queue)[0] == "b0"
    assert ids(queue)[1:] == [f"a{i}" for i in range(500)]  # FIFO within a user stays


def test_teams_share_before_users_do() -> None:
    # Team "nlp" has three users, team "vision" one; the teams alternate, not the four users.
    jobs = [job(f"{u}{i}", u, "nlp", created=i * 10 + k) for k, u in enumerate("xyz") for i in range(4)]
    jobs += [job(f"v{i}", "vera", "vision", created=100.0 + i) for i in range(4)]
    queue = order(jobs, {}, PER_GPU)
    teams = ["vision" if w.owner == "vera" else "nlp" for w in queue[:8]]
    assert teams == ["nlp", "vision"] * 4
    # Within nlp the users take turns; each user's jobs stay in their order.
    nlp = [w for w in queue if w.owner != "vera"]
    assert [w.owner for w in nlp[:3]] == ["x", "y", "z"]
    for u in "xyz":
        assert [w.id for w in nlp if w.owner == u] == [f"{u}{i}" for i in range(4)]
    # A team's past use sends it behind, even for its least-used user.
    queue = order(jobs, {team_key("nlp", "x"): 5.0, user_key("vera"): 3.0}, PER_GPU)
    assert ids(queue)[:5] == ["v0", "v1", "v2", "v3", "x0"]


def test_priority_comes_before_fair_share() -> None:
    jobs = [job("low", "bob", "vision", created=0.0), job("high", "alice", "vision", created=5.0, priority=10)]
    assert ids(order(jobs, {user_key("alice"): 1000.0, team_key("vision", "alice"): 1000.0}, PER_GPU)) == ["high", "low"]


def test_multi_gpu_jobs_count_by_their_gpus() -> None:
    # alice's first job takes 8 GPUs: bob's 1-GPU jobs catch up before her next.
    jobs = [job("a-big", "alice", "t", 0.0, gpus=8), job("a-next", "alice", "t", 1.0)]
    jobs += [job(f"b{i}", "bob", "t", 2.0 + i) for i in range(9)]
    queue = ids(order(jobs, {}, PER_GPU))
    assert queue[0] == "a-big" and queue.index("a-next") > queue.index("b7")


def test_use_decays_with_the_half_life() -> None:
    assert decayed(8.0, at=0.0, t=24 * 3600.0, half_life_h=24.0) == 4.0
    assert decayed(8.0, at=0.0, t=48 * 3600.0, half_life_h=24.0) == 2.0
    assert decayed(8.0, at=100.0, t=50.0, half_life_h=24.0) == 8.0  # a clock behind the row's: no growth
    # Old heavy use counts less than recent light use once decayed.
    old_heavy = decayed(40.0, at=0.0, t=7 * 24 * 3600.0, half_life_h=24.0)  # 40 / 128
    recent = decayed(1.0, at=7 * 24 * 3600.0 - 3600, t=7 * 24 * 3600.0, half_life_h=24.0)
    jobs = [job("carol0", "carol", "t", 0.0), job("dan0", "dan", "t", 1.0)]
    use = {user_key("carol"): recent, user_key("dan"): old_heavy}
    assert ids(order(jobs, use, PER_GPU)) == ["dan0", "carol0"]


def test_ordering_10000_jobs_is_one_pass() -> None:
    import time

    jobs = [job(f"j{i}", f"u{i % 20}", f"t{i % 4}", float(i), gpus=1 + i % 4, priority=i % 3) for i in range(10_000)]
    t0 = time.process_time()
    queue = order(jobs, {}, PER_GPU)
    assert len(queue) == 10_000 and len({w.id for w in queue}) == 10_000
    # Generous: seconds of CPU on a shared machine; a per-job scan of the queue would take minutes.
    assert time.process_time() - t0 < 10


def test_an_order_of_each_users_oldest_jobs_is_a_prefix_of_the_full_order() -> None:
    """Workers order only the oldest jobs of each user (core.scheduling.FairQueue): that part of
    the order must be exactly the start of the order of the whole queue."""
    import random

    from core.fairshare import order_prefix

    rng = random.Random(7)
    for _ in range(50):
        owners = [rng.randrange(6) for _ in range(rng.randrange(1, 120))]
        jobs = [job(f"j{i}", f"u{u}", f"t{u % 3}", created=rng.random() * 100,  # a user is in one team
                    gpus=rng.choice((1, 2, 8)), priority=rng.choice((0, 0, 5))) for i, u in enumerate(owners)]
        use = {user_key(f"u{i}"): rng.random() * 5 for i in range(6)}
        full = ids(order(jobs, use, PER_GPU))
        k = rng.randrange(1, 6)
        groups: dict[tuple[int, str], list[Waiting]] = {}
        for w in jobs:
            groups.setdefault((w.priority, w.owner), []).append(w)
        kept = [w for g in groups.values() for w in sorted(g, key=lambda w: (w.created_at, w.id))[:k]]
        more = frozenset(key for key, g in groups.items() if len(g) > k)
        part, complete = order_prefix(kept, use, PER_GPU, more)
        assert ids(part) == full[: len(part)] and part
        assert complete == (not more) or len(part) < len(full)
