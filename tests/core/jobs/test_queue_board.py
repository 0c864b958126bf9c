"""The queue's places are computed once per change of the queue, shared by every reader,
and stay right (core.jobs.queue_board through JobStore, on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import event

from core.db import utcnow
from core.jobs.job import JobState
from tests.support.quota_db import admit


class Statements:
    """Counts the SQL statements an engine runs (a real listener on the real engine)."""

    def __init__(self, engine):
        self.count = 0
        event.listen(engine.sync_engine, "before_cursor_execute", self._seen)

    def _seen(self, *args) -> None:
        self.count += 1


async def _queue(store, n: int, guilds: int = 5) -> list[int]:
    base = utcnow() - timedelta(minutes=30)
    return [(await admit(store, user_id=100 + k % 7, guild_id=k % guilds, created_at=base + timedelta(seconds=k))).id
            for k in range(n)]


async def test_many_snapshots_compute_the_order_once(db):
    store = db.store()
    ids = await _queue(store, 40)
    statements = Statements(db.engines[0])
    snapshots = [await store.queue_snapshot(job_id) for job_id in ids]
    assert statements.count <= 3  # the queued rows and the served times, once (was 2 per snapshot)
    assert store.board.computations == 1
    assert sorted(s.position for s in snapshots) == list(range(1, 41))
    assert {s.length for s in snapshots} == {40}


async def test_concurrent_snapshots_share_one_computation(db):
    store = db.store()
    ids = await _queue(store, 30)
    snapshots = await asyncio.gather(*(store.queue_snapshot(job_id) for job_id in ids))
    assert store.board.computations == 1
    assert sorted(s.position for s in snapshots) == list(range(1, 31))


async def test_each_change_of_the_queue_is_seen_once(db):
    """A claim, a cancel, an admission and a requeue each make the next reader recompute,
    once, and the places it reads are those a fresh store (no cache) computes."""
    store = db.store()
    ids = await _queue(store, 12)
    await store.queue_snapshot(ids[0])

    async def places_agree() -> None:
        fresh = db.store()  # a store of its own: nothing cached
        for job_id in ids:
            assert await store.queue_snapshot(job_id) == await fresh.queue_snapshot(job_id), job_id

    changes = [
        lambda: store.claim_next("w"),
        lambda: store.request_cancel(ids[5]),
        lambda: admit(store, user_id=999, guild_id=77),
        lambda: store.requeue_running(None),
    ]
    for k, change in enumerate(changes, start=2):
        await change()
        await places_agree()
        assert store.board.computations == k, k
    assert (await store.queue_snapshot(ids[5])).position is None


async def test_a_progress_update_does_not_recompute_the_order(db):
    store = db.store()
    ids = await _queue(store, 3)
    running = await store.claim_next("w")
    await store.queue_snapshot(ids[1])
    before = store.board.computations
    await store.update(running.id, progress=0.5)
    await store.queue_snapshot(ids[1])
    assert store.board.computations == before


async def test_a_change_by_another_process_shows_within_max_age(db):
    mine, theirs = db.store(), db.store()
    mine.board.max_age_s = 0.2
    ids = await _queue(mine, 3)
    assert (await mine.queue_snapshot(ids[2])).position == 3
    await theirs.claim_next("elsewhere")
    await asyncio.sleep(0.25)
    assert (await mine.queue_snapshot(ids[2])).position == 2


async def test_the_order_covers_more_than_two_thousand_jobs(db):
    """The fair order used to read only the 2,000 oldest queued jobs: the rest had no place."""
    store = db.store()
    base = utcnow() - timedelta(hours=1)
    await db.sql("INSERT INTO jobs (created_at, updated_at, user_id, guild_id, attachment_size_limit, source_kind, "
                 "source_url, source_name, model, stems, format, priority, state, progress, attempts, "
                 "cancel_requested, slot_state, quota_state, reserved_s, cache_hit) "
                 "SELECT :t, :t, 1, 1, 10, 'attachment', 'u', 'a.mp3', 'tiny', 'all', 'mp3', 0, 'queued', 0, 0, "
                 "false, 'none', 'none', 0, false FROM (SELECT 1) AS one", t=base)
    for _ in range(12):  # doubling: 4,096 rows
        await db.sql("INSERT INTO jobs (created_at, updated_at, user_id, guild_id, attachment_size_limit, "
                     "source_kind, source_url, source_name, model, stems, format, priority, state, progress, "
                     "attempts, cancel_requested, slot_state, quota_state, reserved_s, cache_hit) "
                     "SELECT created_at, updated_at, user_id, guild_id, attachment_size_limit, source_kind, "
                     "source_url, source_name, model, stems, format, priority, state, progress, attempts, "
                     "cancel_requested, slot_state, quota_state, reserved_s, cache_hit FROM jobs")
    last = await admit(store, user_id=2, guild_id=1, created_at=base + timedelta(minutes=1))
    snapshot = await store.queue_snapshot(last.id)
    assert snapshot.length == 4097
    assert snapshot.position is not None


async def test_only_queued_jobs_with_a_usable_token_are_shown_again(db):
    store = db.store()
    fresh = await admit(store, user_id=1, interaction_token="t1", token_expires_at=utcnow() + timedelta(minutes=10))
    expired = await admit(store, user_id=2, interaction_token="t2", token_expires_at=utcnow() + timedelta(seconds=5))
    no_token = await admit(store, user_id=3)
    for job in (fresh, expired, no_token):
        await store.update(job.id, status_message_id=1000 + job.id)
    running = await admit(store, user_id=4, interaction_token="t4", token_expires_at=utcnow() + timedelta(minutes=10))
    await store.update(running.id, status_message_id=5, state=JobState.separating.value)
    assert [job.id for job in await store.queued_to_show()] == [fresh.id]
