"""core.jobs.fair_order, and claim_next / queue_snapshot following it on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.db import utcnow
from core.jobs.fair_order import QueuedJob, fair_order
from tests.support.quota_db import admit

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class Queue:
    """Builds QueuedJobs with increasing ids and creation times."""

    def __init__(self):
        self.jobs: list[QueuedJob] = []

    def add(self, user: int, guild: int = 1, priority: int = 0, at: int | None = None) -> int:
        job_id = len(self.jobs) + 1
        created = T0 + timedelta(seconds=job_id if at is None else at)
        self.jobs.append(QueuedJob(job_id, priority, created, guild, user))
        return job_id

    def order(self, last_guild=None, last_user=None) -> list[int]:
        return fair_order(list(self.jobs), last_guild or {}, last_user or {})


def users_of(queue: Queue, order: list[int]) -> list[int]:
    by_id = {job.id: job for job in queue.jobs}
    return [by_id[job_id].user for job_id in order]


def test_empty_queue():
    assert fair_order([], {}, {}) == []


def test_a_single_users_jobs_run_oldest_first():
    queue = Queue()
    ids = [queue.add(user=1, at=at) for at in (30, 10, 20)]
    assert queue.order() == [ids[1], ids[2], ids[0]]


def test_priority_comes_first():
    queue = Queue()
    bulk = queue.add(user=1, priority=5)
    normal = [queue.add(user=2), queue.add(user=3)]
    urgent = queue.add(user=4, priority=-1)
    urgent_again = queue.add(user=4, priority=-1)
    # Even a user who was just served, and waits on their own, goes first at a higher priority.
    order = queue.order(last_guild={1: 1e9}, last_user={(1, 4): 1e9})
    assert order[:2] == [urgent, urgent_again]
    assert set(order[2:4]) == set(normal)
    assert order[-1] == bulk


def test_a_flood_does_not_push_back_another_users_single_job():
    queue = Queue()
    flood = [queue.add(user=1) for _ in range(10)]
    single = queue.add(user=2)
    order = queue.order()
    assert len(order) == 11 and set(order) == {*flood, single}
    assert order.index(single) == 1  # runs 2nd, not 11th
    assert order[0] == flood[0]
    assert [job_id for job_id in order if job_id != single] == flood  # the flood stays in its order


def test_users_take_turns_round_robin():
    queue = Queue()
    for _ in range(4):
        queue.add(user=1)
    for _ in range(2):
        queue.add(user=2)
    for _ in range(3):
        queue.add(user=3)
    assert users_of(queue, queue.order()) == [1, 2, 3, 1, 2, 3, 1, 3, 1]


def test_servers_take_turns_before_users_within_a_server():
    queue = Queue()
    for user in (1, 2, 3):  # three users of a busy server
        queue.add(user=user, guild=10)
        queue.add(user=user, guild=10)
    lone = [queue.add(user=9, guild=20), queue.add(user=9, guild=20)]  # one user of a quiet server
    order = queue.order()
    guilds = {job.id: job.guild for job in queue.jobs}
    # The quiet server gets every other turn while it has jobs, not one turn in four.
    assert [guilds[job_id] for job_id in order[:4]] == [10, 20, 10, 20]
    assert order[1] == lone[0] and order[3] == lone[1]
    # Within the busy server its users still take turns.
    assert users_of(queue, [j for j in order if guilds[j] == 10]) == [1, 2, 3, 1, 2, 3]


def test_last_served_times_are_respected():
    queue = Queue()
    recent = queue.add(user=1, at=1)  # the oldest job, but its user was just served
    never = queue.add(user=2, at=5)
    earlier = queue.add(user=3, at=3)
    last_user = {(1, 1): 1000.0, (1, 3): 500.0}
    order = queue.order(last_guild={1: 1000.0}, last_user=last_user)
    assert order == [never, earlier, recent]
    # Servers likewise: a server served recently waits behind one never served.
    queue = Queue()
    busy = queue.add(user=1, guild=1, at=1)
    quiet = queue.add(user=2, guild=2, at=2)
    assert queue.order(last_guild={1: 50.0}, last_user={(1, 1): 50.0}) == [quiet, busy]
    assert queue.order(last_guild={2: 50.0}, last_user={(2, 2): 50.0}) == [busy, quiet]


def test_the_same_user_in_two_servers_is_two_users():
    queue = Queue()
    a = queue.add(user=1, guild=1)
    b = queue.add(user=1, guild=2)
    # Served in server 1 only: server 2's job is next.
    assert queue.order(last_guild={1: 10.0}, last_user={(1, 1): 10.0}) == [b, a]


def test_fair_order_does_not_modify_its_inputs():
    queue = Queue()
    for user in (1, 1, 2):
        queue.add(user=user)
    jobs, last_guild, last_user = list(queue.jobs), {1: 3.0}, {(1, 1): 3.0}
    fair_order(jobs, last_guild, last_user)
    assert jobs == queue.jobs and last_guild == {1: 3.0} and last_user == {(1, 1): 3.0}


# -- on a real database ----------------------------------------------------------------------


async def _claims_follow_snapshots(store, expected: list[int]) -> None:
    """Before every claim, the job at position 1 is the one claimed, and the positions
    of all queued jobs are the rest of the expected order."""
    for k, job_id in enumerate(expected):
        rest = expected[k:]
        for position, queued_id in enumerate(rest, start=1):
            snapshot = await store.queue_snapshot(queued_id)
            assert (snapshot.position, snapshot.length) == (position, len(rest)), (k, queued_id)
        claimed = await store.claim_next("w")
        assert claimed is not None and claimed.id == job_id, (k, claimed and claimed.id, job_id)
        assert (await store.queue_snapshot(job_id)).position is None
    assert await store.claim_next("w") is None


async def test_claim_next_lets_a_later_user_in_after_one_job(db):
    store = db.store()
    base = utcnow() - timedelta(minutes=10)
    a = [await admit(store, user_id=1, created_at=base + timedelta(seconds=k)) for k in range(5)]
    b = await admit(store, user_id=2, created_at=base + timedelta(minutes=1))
    expected = [a[0].id, b.id, a[1].id, a[2].id, a[3].id, a[4].id]
    await _claims_follow_snapshots(store, expected)


async def test_claim_next_alternates_servers_then_users(db):
    store = db.store()
    base = utcnow() - timedelta(minutes=10)
    a = [await admit(store, user_id=1, guild_id=10, created_at=base + timedelta(seconds=k)) for k in range(4)]
    c = await admit(store, user_id=3, guild_id=20, created_at=base + timedelta(seconds=30))
    b = await admit(store, user_id=2, guild_id=10, created_at=base + timedelta(seconds=40))
    await _claims_follow_snapshots(store, [a[0].id, c.id, b.id, a[1].id, a[2].id, a[3].id])


async def test_claim_next_remembers_who_was_served_before(db):
    """Served times come from the rows: a user whose job started a minute ago waits behind
    a user who has not been served today, even with an older job."""
    store = db.store()
    base = utcnow() - timedelta(minutes=10)
    served = await admit(store, user_id=1, created_at=base)
    assert (await store.claim_next("w")).id == served.id
    old = await admit(store, user_id=1, created_at=base + timedelta(seconds=1))
    newcomer = await admit(store, user_id=2, created_at=base + timedelta(minutes=5))
    await _claims_follow_snapshots(store, [newcomer.id, old.id])


def reference_fair_order(queued, last_guild, last_user) -> list[int]:
    """The rule as first written: pick each next job by scanning all the rest (n squared).
    The heap version must give exactly its order."""
    remaining = sorted(queued, key=lambda j: (j.created_at, j.id))
    last_guild, last_user = dict(last_guild), dict(last_user)
    never = float("-inf")
    tick = max([*last_guild.values(), *last_user.values(), 0.0]) + 1.0
    order = []
    while remaining:
        top = min(j.priority for j in remaining)
        candidates = [j for j in remaining if j.priority == top]
        guild = min(candidates, key=lambda j: last_guild.get(j.guild, never)).guild
        in_guild = [j for j in candidates if j.guild == guild]
        job = min(in_guild, key=lambda j: last_user.get((j.guild, j.user), never))
        order.append(job.id)
        remaining.remove(job)
        last_guild[job.guild] = last_user[(job.guild, job.user)] = tick
        tick += 1.0
    return order


def test_the_order_is_the_reference_rule_s_on_random_queues():
    import random

    rng = random.Random(20261206)
    for _ in range(400):
        queue = Queue()
        guilds, users = rng.randint(1, 6), rng.randint(1, 6)
        for _ in range(rng.randint(0, 60)):
            # Few distinct creation times and served times: ties are common, as they must be tested.
            queue.add(user=rng.randint(1, users), guild=rng.randint(1, guilds), priority=rng.choice((-1, 0, 0, 5)),
                      at=rng.randint(0, 10))
        times = [float(rng.randint(1, 4)) for _ in range(3)]
        last_guild = {g: rng.choice(times) for g in range(1, guilds + 1) if rng.random() < 0.5}
        last_user = {(g, u): rng.choice(times) for g in range(1, guilds + 1) for u in range(1, users + 1)
                     if rng.random() < 0.3}
        assert queue.order(last_guild, last_user) == reference_fair_order(queue.jobs, last_guild, last_user)


async def test_the_stores_order_from_sql_age_order_is_fair_orders_with_equal_creation_times(db):
    """The store reads the queue oldest first from SQL (ORDER BY created_at, id) and never
    compares timestamps itself: ties and DM jobs (no server) must come out as fair_order's."""
    import random

    rng = random.Random(15)
    store = db.store()
    base = utcnow() - timedelta(minutes=5)
    queued = []
    for _ in range(60):
        created = base + timedelta(seconds=rng.randint(0, 3), microseconds=rng.choice((0, 0, 1)))
        job = await admit(store, user_id=rng.randint(1, 5), guild_id=rng.choice((None, 1, 2, 3)),
                          priority=rng.choice((0, 0, 5)), created_at=created)
        queued.append(QueuedJob(job.id, job.priority, created, job.guild_id or 0, job.user_id))
    expected = fair_order(queued, {}, {})
    assert [(await store.queue_snapshot(job_id)).position for job_id in expected] == list(range(1, 61))
