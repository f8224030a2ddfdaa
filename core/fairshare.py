"""Fair share: among jobs of equal priority, GPUs go first to the team, and within it the user,
that used the fewest GPU-hours lately.

Use is a decayed sum of GPU-hours: each hour counts half after `fair_share_half_life_h`. The
database holds it (table `gpu_usage`, one row per user and per team), so every API process,
worker and host orders the queue alike. A running job is charged as it runs: when its lease is
renewed (at most every ACCRUE_S) and when it stops holding its GPUs. `jobs.usage_charged_at`
says up to when it was charged; it moves forward only under the job's lease lock, so no
interval is charged twice. The order reads the table plus what each running job used since its
`usage_charged_at`, so it sees use up to the moment it is made, however rare the renewals.

The order itself is a merge. Among jobs of one priority, the team with the least use is served
first, then within it the user with the least use, whose oldest job goes next (FIFO within a
user). Each job ordered ahead, and each GPU running now, counts `fair_share_job_gpu_hours` per GPU
on its team and user: the GPU-hours it is expected to use before it shows in the decayed sum.
So several GPUs that come free at once go round the users instead of all to one, and 500 jobs
of one user do not hide a colleague's single job.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from core import states
from core.db import dialect_insert
from core.models import GpuUsage, Job, User
from core.settings import get_settings

ACCRUE_S = 60.0  # a running job's use reaches the table at most this often (and when it stops)


def user_key(owner_id: str | None) -> str:
    return f"user:{owner_id or ''}"


def team_key(team_id: str | None, owner_id: str | None) -> str:
    # A user with no team is a team of one: it competes with teams, not inside one.
    return f"team:{team_id}" if team_id else f"solo:{owner_id or ''}"


def decayed(gpu_hours: float, at: float, t: float, half_life_h: float) -> float:
    return gpu_hours * 0.5 ** (max(0.0, t - at) / (half_life_h * 3600.0))


# -- recording use ---------------------------------------------------------------------------

def _add(db: Session, principal: str, gpu_hours: float, t: float, half_life_h: float) -> None:
    """Add GPU-hours to a principal's decayed sum, in the caller's transaction.

    The row is locked by an UPDATE before it is read, so two hosts adding at once both count."""
    ins = dialect_insert(db, GpuUsage)
    db.execute(ins.values(principal=principal, gpu_hours=0.0, at=t).on_conflict_do_nothing())
    db.execute(update(GpuUsage).where(GpuUsage.principal == principal).values(at=GpuUsage.at)
               .execution_options(synchronize_session=False))
    row = db.execute(select(GpuUsage.gpu_hours, GpuUsage.at).where(GpuUsage.principal == principal)).one()
    value = decayed(row.gpu_hours, row.at, t, half_life_h) + gpu_hours
    db.execute(update(GpuUsage).where(GpuUsage.principal == principal).values(gpu_hours=value, at=max(t, row.at))
               .execution_options(synchronize_session=False))


def charge(db: Session, job: Job, t: float, *, stop: bool = False) -> float:
    """Charge `job`'s GPUs from its `usage_charged_at` to t; the caller holds the job's lease lock
    and commits. stop=True: the job gives its GPUs back, nothing more accrues. Returns GPU-hours."""
    since = job.usage_charged_at
    job.usage_charged_at = None if stop else t
    if since is None or t <= since:
        return 0.0
    hours = job.total_gpus * (t - since) / 3600.0  # a job across hosts holds gpus on each
    s = get_settings()
    team = db.scalar(select(User.team_id).where(User.id == job.owner_id)) if job.owner_id else None
    # Always in this order (team, then user): two jobs charging at once cannot deadlock.
    for principal in (team_key(team, job.owner_id), user_key(job.owner_id)):
        _add(db, principal, hours, t, s.fair_share_half_life_h)
    return hours


def on_transition(db: Session, job: Job, current: str, target: str, t: float) -> None:
    """Start the meter when a job takes GPUs, charge and stop it when it gives them back."""
    holding = (states.RUNNING, states.CANCELLING)
    if target == states.RUNNING and current not in holding:
        job.usage_charged_at = t
    elif current in holding and target not in holding:
        charge(db, job, t, stop=True)


def accrue(db: Session, job: Job, t: float) -> None:
    """On a lease renewal: charge a running job's use so far, at most every ACCRUE_S."""
    if job.usage_charged_at is not None and t - job.usage_charged_at >= ACCRUE_S:
        charge(db, job, t)


# -- ordering --------------------------------------------------------------------------------

class Queued(Protocol):
    id: str
    gpus: int
    nodes: int
    priority: int
    owner: str
    team: str
    created_at: float


def usage_now(db: Session, t: float) -> dict[str, float]:
    """Decayed GPU-hours per principal, plus what the GPUs running now used since they were last
    charged and the use expected of them still (`fair_share_job_gpu_hours` each)."""
    s = get_settings()
    use: dict[str, float] = defaultdict(float)
    for r in db.execute(select(GpuUsage.principal, GpuUsage.gpu_hours, GpuUsage.at)):
        use[r.principal] = decayed(r.gpu_hours, r.at, t, s.fair_share_half_life_h)
    # What running jobs used since they were last charged counts now, not at their next renewal.
    since = func.coalesce(Job.usage_charged_at, t)
    held = Job.gpus * func.coalesce(Job.spec["nodes"].as_integer(), 1)  # a job across hosts holds gpus on each
    uncharged = func.sum(held * func.max(0.0, t - since) if db.get_bind().dialect.name == "sqlite"
                         else held * func.greatest(0.0, t - since))
    running = db.execute(
        select(Job.owner_id, User.team_id, func.sum(held), uncharged)
        .outerjoin(User, User.id == Job.owner_id)
        .where(Job.status.in_([states.RUNNING, states.CANCELLING]))
        .group_by(Job.owner_id, User.team_id)
    ).all()
    for owner, team, gpus, gpu_s in running:
        extra = float(gpus or 0) * s.fair_share_job_gpu_hours + float(gpu_s or 0) / 3600.0
        use[user_key(owner)] += extra
        use[team_key(team, owner)] += extra
    return use


def order(jobs: Iterable[Queued], use: dict[str, float], job_gpu_hours: float) -> list[Queued]:
    """Queued jobs in fair-share order: priority desc; within it team, then user, by least use;
    FIFO within a user. `jobs` may come in any order. Cost O(n log n)."""
    return order_prefix(jobs, use, job_gpu_hours)[0]


def order_prefix(jobs: Iterable[Queued], use: dict[str, float], job_gpu_hours: float,
                 more: frozenset[tuple[int, str]] = frozenset()) -> tuple[list[Queued], bool]:
    """`order` of a queue read in part: `more` names the (priority, owner) whose oldest jobs only
    were read. The order is exact up to the first of those running out, where it stops; the
    flag says whether it reached the end."""
    by_prio: dict[int, dict[str, dict[str, list[Queued]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for j in jobs:
        by_prio[j.priority][j.team][j.owner].append(j)
    use = defaultdict(float, use)
    out: list[Queued] = []
    for prio in sorted(by_prio, reverse=True):
        teams = by_prio[prio]
        for users in teams.values():
            for q in users.values():
                q.sort(key=lambda j: (j.created_at, j.id))
                q.reverse()  # pop() from the end takes the oldest
        cut = {owner for p, owner in more if p == prio}
        if not _merge(teams, use, job_gpu_hours, cut, out):
            return out, False
    return out, True


def _merge(teams: dict[str, dict[str, list[Queued]]], use: dict[str, float], per_gpu: float,
           cut: set[str], out: list[Queued]) -> bool:
    """Serve the least-used team, within it the least-used user; ties go to the older next job.
    Appends to `out`; False when it stopped at a user in `cut` whose read jobs ran out."""
    def entry(key: str, q: list[Queued]) -> tuple[float, float, str, str]:
        return use[key], q[-1].created_at, q[-1].id, key

    user_heaps = {team: [entry(user_key(u), q) for u, q in users.items()] for team, users in teams.items()}
    for h in user_heaps.values():
        heapq.heapify(h)
    team_heap = [(use[team], h[0][1], h[0][2], team) for team, h in user_heaps.items()]
    heapq.heapify(team_heap)
    while team_heap:
        team = heapq.heappop(team_heap)[3]
        h = user_heaps[team]
        ukey = heapq.heappop(h)[3]
        owner = ukey[len("user:"):]
        q = teams[team][owner]
        job = q.pop()
        out.append(job)
        if not q and owner in cut:
            return False
        held = job.gpus * job.nodes
        use[ukey] += held * per_gpu
        use[team] += held * per_gpu
        if q:
            heapq.heappush(h, entry(ukey, q))
        if h:  # among teams of equal use, the one whose next job is older goes first
            heapq.heappush(team_heap, (use[team], h[0][1], h[0][2], team))
    return True
