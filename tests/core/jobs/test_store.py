"""core.jobs.store: the job row and its guarded state machine on a real SQLite file."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.exc import SQLAlchemyError

from core.db import Base, alembic_config, make_engine, make_sessions, upgrade, utcnow
from core.errors import TooLongError
from core.jobs.job import FINAL, RUNNING, Job, JobState
from core.jobs.store import JobStore
from core.media.render import RenderOptions

FIELDS = dict(source_kind="attachment", source_url="https://cdn.example/a.mp3", source_name="a.mp3",
              model="tiny", stems="all", format="mp3")


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url


@pytest_asyncio.fixture
async def store(db_url):
    engine = make_engine(db_url)
    yield JobStore(make_sessions(engine))
    await engine.dispose()


async def new_job(store: JobStore, user_id: int = 1, **fields) -> Job:
    return await store.create(**{**FIELDS, "user_id": user_id, **fields})


async def force_state(store: JobStore, job_id: int, state: JobState) -> None:
    """Put a row in `state` directly (setting up a test, not a transition under test)."""
    await store.update(job_id, state=state.value)


def row_snapshot(job: Job) -> dict:
    return {c.key: getattr(job, c.key) for c in inspect(Job).mapper.column_attrs}


# -- round trip ----------------------------------------------------------------------------


async def test_create_get_round_trip_keeps_values_and_utc_datetimes(store):
    expires = utcnow() + timedelta(minutes=15)
    created = await new_job(store, user_id=42, guild_id=7, interaction_token="tok", token_expires_at=expires,
                            artifacts=None, priority=2)
    assert created.id is not None
    assert created.state == "queued" and created.attempts == 0 and created.progress == 0.0

    job = await store.get(created.id)
    assert job is not None and job is not created
    assert (job.user_id, job.guild_id, job.source_name, job.priority) == (42, 7, "a.mp3", 2)
    assert job.job_state is JobState.queued and not job.is_final
    assert job.cancel_requested is False
    for value in (job.created_at, job.updated_at, job.token_expires_at):
        assert value.tzinfo is not None and value.utcoffset() == timedelta(0)
    assert job.token_expires_at == expires
    assert abs(job.created_at - utcnow()) < timedelta(seconds=10)

    # Usable until 60 s before expiry, not after.
    assert job.token_usable()
    assert job.token_usable(now=expires - timedelta(seconds=61))
    assert not job.token_usable(now=expires - timedelta(seconds=59))
    assert not job.token_usable(now=expires + timedelta(seconds=1))
    # Without a token there is nothing to use.
    bare = await store.get((await new_job(store, token_expires_at=expires)).id)
    assert not bare.token_usable()

    assert await store.get(created.id + 1000) is None


async def test_naive_datetimes_are_refused(store):
    with pytest.raises(Exception, match="naive datetime"):
        await new_job(store, interaction_token="t", token_expires_at=datetime(2030, 1, 1))


async def test_json_artifacts_and_update_round_trip(store):
    job = await new_job(store)
    artifacts = {"files": {"vocals": "vocals.mp3"}, "sizes": {"vocals": 123}, "mode": "attach"}
    await store.update(job.id, artifacts=artifacts, status_message_id=99, progress=0.5)
    again = await store.get(job.id)
    assert again.artifacts == artifacts
    assert again.status_message_id == 99 and again.progress == 0.5
    assert again.state == "queued"  # update never moves the state
    assert again.updated_at >= job.updated_at


# -- transitions ---------------------------------------------------------------------------


async def test_happy_path_through_every_state(store):
    job = await new_job(store)
    claimed = await store.claim_next("w1")
    assert claimed.id == job.id and claimed.job_state is JobState.fetching
    assert claimed.worker == "w1" and claimed.attempts == 1 and claimed.started_at is not None
    assert claimed.finished_at is None

    for state in (JobState.decoding, JobState.separating, JobState.encoding, JobState.delivering):
        assert await store.transition(job.id, state), state
        current = await store.get(job.id)
        assert current.job_state is state
        assert current.finished_at is None
    await store.update(job.id, progress=0.7)
    assert await store.transition(job.id, JobState.done, delivered_at=utcnow())
    done = await store.get(job.id)
    assert done.job_state is JobState.done and done.is_final
    assert done.finished_at is not None and done.finished_at.tzinfo is not None
    assert done.delivered_at is not None
    assert done.finished_at >= done.started_at


async def test_entering_a_running_state_resets_progress(store):
    job = await new_job(store)
    await store.claim_next("w")
    await store.transition(job.id, JobState.decoding)
    await store.update(job.id, progress=0.9)
    assert await store.transition(job.id, JobState.separating, duration_s=12.5)
    current = await store.get(job.id)
    assert current.progress == 0.0 and current.duration_s == 12.5


@pytest.mark.parametrize("start, to", [
    (JobState.queued, JobState.done),
    (JobState.queued, JobState.decoding),
    (JobState.queued, JobState.delivering),
    (JobState.fetching, JobState.separating),
    (JobState.decoding, JobState.encoding),
    (JobState.separating, JobState.delivering),
    (JobState.encoding, JobState.done),
    (JobState.delivering, JobState.queued),
    (JobState.delivering, JobState.cancelled),
    (JobState.done, JobState.failed),
    (JobState.done, JobState.cancelled),
    (JobState.done, JobState.queued),
    (JobState.failed, JobState.done),
    (JobState.failed, JobState.queued),
    (JobState.cancelled, JobState.decoding),
    (JobState.cancelled, JobState.failed),
    (JobState.cancelled, JobState.queued),
])
async def test_illegal_moves_are_refused_and_change_nothing(store, start, to):
    job = await new_job(store)
    await force_state(store, job.id, start)
    before = row_snapshot(await store.get(job.id))
    assert not await store.transition(job.id, to, error="nope", progress=0.3)
    after = row_snapshot(await store.get(job.id))
    assert after == before
    assert after["state"] == start.value and after["finished_at"] is None


@pytest.mark.parametrize("start", [JobState.queued, *RUNNING, JobState.delivering])
async def test_every_unfinished_state_can_fail_and_sets_finished_at(store, start):
    job = await new_job(store)
    await force_state(store, job.id, start)
    assert await store.transition(job.id, JobState.failed, error="boom", error_kind="internal")
    failed = await store.get(job.id)
    assert failed.job_state is JobState.failed and failed.finished_at is not None
    assert (failed.error, failed.error_kind) == ("boom", "internal")
    # Final is final.
    assert not await store.transition(job.id, JobState.failed, error="again")
    assert (await store.get(job.id)).error == "boom"


async def test_transition_of_a_missing_job_is_false(store):
    assert not await store.transition(12345, JobState.failed)


# -- claiming ------------------------------------------------------------------------------


async def test_claim_next_takes_priority_then_age(store):
    base = utcnow() - timedelta(minutes=10)
    old_low = await new_job(store, priority=5, created_at=base)
    new_high = await new_job(store, priority=0, created_at=base + timedelta(minutes=2))
    old_high = await new_job(store, priority=0, created_at=base + timedelta(minutes=1))
    same_time_a = await new_job(store, priority=1, created_at=base + timedelta(minutes=3))
    same_time_b = await new_job(store, priority=1, created_at=base + timedelta(minutes=3))
    order = [old_high.id, new_high.id, same_time_a.id, same_time_b.id, old_low.id]
    claimed = [(await store.claim_next("w")).id for _ in order]
    assert claimed == order
    assert await store.claim_next("w") is None


async def test_claim_skips_jobs_that_are_not_queued(store):
    running = await new_job(store)
    await force_state(store, running.id, JobState.separating)
    cancelled = await new_job(store)
    await store.request_cancel(cancelled.id)
    waiting = await new_job(store)
    assert (await store.claim_next("w")).id == waiting.id
    assert await store.claim_next("w") is None


async def test_concurrent_claimers_on_two_engines_never_share_a_job(db_url):
    engines = [make_engine(db_url), make_engine(db_url)]
    stores = [JobStore(make_sessions(e)) for e in engines]
    try:
        jobs = [await new_job(stores[0], user_id=k) for k in range(24)]
        claims = await asyncio.gather(*(stores[k % 2].claim_next(f"w{k % 2}") for k in range(40)))
        claimed = [job.id for job in claims if job is not None]
        assert sorted(claimed) == sorted(job.id for job in jobs)  # each exactly once
        assert len(claimed) == len(set(claimed))
        assert sum(job is None for job in claims) == 40 - len(jobs)
        for job in claims:
            if job is not None:
                assert job.job_state is JobState.fetching and job.attempts == 1
        rows = [await stores[1].get(job.id) for job in jobs]
        assert all(row.state == "fetching" and row.attempts == 1 for row in rows)
        # The worker named on each row is the one that got it back from claim_next.
        by_id = {job.id: job.worker for job in claims if job is not None}
        assert all(row.worker == by_id[row.id] for row in rows)
        assert await stores[0].queue_length() == 0
    finally:
        for engine in engines:
            await engine.dispose()


async def test_attempts_count_every_claim(store):
    job = await new_job(store)
    for attempt in (1, 2, 3):
        claimed = await store.claim_next("w")
        assert claimed.id == job.id and claimed.attempts == attempt
        assert await store.transition(job.id, JobState.queued)
        assert (await store.get(job.id)).attempts == attempt


# -- queue ---------------------------------------------------------------------------------


async def test_queue_snapshot_positions_and_length(store):
    base = utcnow() - timedelta(minutes=5)
    jobs = [await new_job(store, created_at=base + timedelta(seconds=k)) for k in range(4)]
    urgent = await new_job(store, priority=-1, created_at=base + timedelta(seconds=10))
    assert await store.queue_length() == 5
    expected = {urgent.id: 1, jobs[0].id: 2, jobs[1].id: 3, jobs[2].id: 4, jobs[3].id: 5}
    for job_id, position in expected.items():
        snapshot = await store.queue_snapshot(job_id)
        assert (snapshot.position, snapshot.length) == (position, 5)

    running = await store.claim_next("w")
    assert running.id == urgent.id
    assert await store.queue_snapshot(urgent.id) == type(snapshot)(None, 4)
    assert (await store.queue_snapshot(jobs[0].id)).position == 1
    assert (await store.queue_snapshot(jobs[3].id)).position == 4
    assert await store.queue_length() == 4

    await store.request_cancel(jobs[1].id)
    assert (await store.queue_snapshot(jobs[1].id)).position is None
    assert (await store.queue_snapshot(jobs[3].id)).position == 3
    assert await store.queue_length() == 3
    missing = await store.queue_snapshot(99999)
    assert (missing.position, missing.length) == (None, 3)


# -- cancelling ----------------------------------------------------------------------------


@pytest.mark.parametrize("start", [JobState.queued, *RUNNING])
async def test_request_cancel_of_queued_or_running_job(store, start):
    job = await new_job(store)
    await force_state(store, job.id, start)
    assert await store.request_cancel(job.id) is JobState.cancelled
    cancelled = await store.get(job.id)
    assert cancelled.job_state is JobState.cancelled and cancelled.finished_at is not None
    assert cancelled.error_kind == "cancelled"
    # A second request is too late.
    assert await store.request_cancel(job.id) is None


@pytest.mark.parametrize("start", [JobState.delivering, JobState.done, JobState.failed])
async def test_request_cancel_is_too_late_once_delivering_or_final(store, start):
    job = await new_job(store)
    await force_state(store, job.id, start)
    assert await store.request_cancel(job.id) is None
    assert (await store.get(job.id)).job_state is start


async def test_request_cancel_of_a_missing_job(store):
    assert await store.request_cancel(4242) is None


# -- recovery ------------------------------------------------------------------------------


async def test_requeue_running_puts_running_jobs_back_and_keeps_attempts(store):
    queued = await new_job(store)
    running = {}
    for state, worker in ((JobState.fetching, "a"), (JobState.decoding, "a"), (JobState.separating, "b"),
                          (JobState.encoding, "a")):
        job = await new_job(store)
        await store.update(job.id, state=state.value, worker=worker, attempts=2, progress=0.4)
        running[job.id] = worker
    finals = {}
    for state in (JobState.delivering, *FINAL):
        job = await new_job(store)
        await store.update(job.id, state=state.value, worker="a", attempts=1)
        finals[job.id] = state

    only_b = await store.requeue_running("b")
    assert only_b == [job_id for job_id, w in running.items() if w == "b"]
    rest = await store.requeue_running()
    assert sorted(rest) == sorted(job_id for job_id, w in running.items() if w == "a")

    for job_id in running:
        job = await store.get(job_id)
        assert job.job_state is JobState.queued
        assert job.attempts == 2 and job.worker is None and job.progress == 0.0
    untouched = await store.get(queued.id)
    assert untouched.job_state is JobState.queued and untouched.attempts == 0
    for job_id, state in finals.items():
        job = await store.get(job_id)
        assert job.job_state is state and job.worker == "a" and job.attempts == 1
    assert await store.requeue_running() == []
    assert await store.queue_length() == 1 + len(running)


async def test_unfinished_lists_every_unfinished_job_in_id_order(store):
    ids = {}
    for state in JobState:
        job = await new_job(store)
        await force_state(store, job.id, state)
        ids[state] = job.id
    unfinished = await store.unfinished()
    assert [job.id for job in unfinished] == sorted(ids[s] for s in JobState if s not in FINAL)


# -- reporting -----------------------------------------------------------------------------


async def test_counts_by_state(store):
    assert await store.counts_by_state() == {}
    for state, n in ((JobState.queued, 3), (JobState.separating, 1), (JobState.done, 2), (JobState.failed, 1)):
        for _ in range(n):
            job = await new_job(store)
            await force_state(store, job.id, state)
    assert await store.counts_by_state() == {"queued": 3, "separating": 1, "done": 2, "failed": 1}


async def test_for_user_only_theirs_newest_first_with_state_filter(store):
    mine = []
    for _ in range(4):
        mine.append(await new_job(store, user_id=10))
        await new_job(store, user_id=20)
    await force_state(store, mine[0].id, JobState.done)
    await force_state(store, mine[2].id, JobState.separating)

    unfinished = await store.for_user(10)
    assert [j.id for j in unfinished] == [mine[3].id, mine[2].id, mine[1].id]
    assert all(j.user_id == 10 for j in unfinished)
    assert [j.id for j in await store.for_user(10, states=[JobState.done])] == [mine[0].id]
    assert [j.id for j in await store.for_user(10, states=list(JobState))] == [j.id for j in reversed(mine)]
    assert [j.id for j in await store.for_user(10, states=list(JobState), limit=2)] == [mine[3].id, mine[2].id]
    assert await store.for_user(30) == []
    assert len(await store.for_user(20)) == 4


# -- migrations ----------------------------------------------------------------------------


def _sync_url(url: str) -> str:
    return url.replace("sqlite+aiosqlite", "sqlite", 1)


def test_migration_creates_exactly_the_orm_schema(db_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(_sync_url(db_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True,
                                                                   "render_as_batch": True})
            diff = compare_metadata(context, Base.metadata)
            assert diff == []
            assert context.get_current_revision() is not None
            indexes = {ix["name"] for ix in inspect(connection).get_indexes("jobs")}
            assert indexes == {ix.name for ix in Job.__table__.indexes}
            assert {"ix_jobs_guild_id", "ix_jobs_state", "ix_jobs_user_id"} <= indexes
            assert set(inspect(connection).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()
    # And Alembic's own check, through the project's env.py.
    command.check(alembic_config(db_url))


def test_downgrade_to_base_and_upgrade_again(db_url):
    from alembic import command

    engine = create_engine(_sync_url(db_url))
    try:
        command.downgrade(alembic_config(db_url), "base")
        assert "jobs" not in inspect(engine).get_table_names()
        upgrade(db_url)
        assert "jobs" in inspect(engine).get_table_names()
        # Upgrading an up-to-date database is a no-op, not an error.
        upgrade(db_url)
        with engine.connect() as connection:
            assert list(connection.execute(select(Job.id))) == []
    finally:
        engine.dispose()


async def test_a_fresh_schema_is_usable_after_a_downgrade_cycle(db_url):
    from alembic import command

    await asyncio.to_thread(command.downgrade, alembic_config(db_url), "base")
    await asyncio.to_thread(upgrade, db_url)
    engine = make_engine(db_url)
    try:
        store = JobStore(make_sessions(engine))
        job = await new_job(store)
        assert (await store.claim_next("w")).id == job.id
    finally:
        await engine.dispose()


def test_upgrade_creates_the_folder_of_a_new_database(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'a' / 'b' / 'new.sqlite'}"
    upgrade(url)
    assert (tmp_path / "a" / "b" / "new.sqlite").is_file()
    engine = create_engine(_sync_url(url))
    try:
        assert "jobs" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_utc_datetimes_survive_other_offsets(db_url):
    """A datetime with a non-UTC offset is stored as the same instant."""
    async def go():
        engine = make_engine(db_url)
        try:
            store = JobStore(make_sessions(engine))
            plus2 = datetime(2030, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
            job = await new_job(store, token_expires_at=plus2, interaction_token="t")
            back = (await store.get(job.id)).token_expires_at
            assert back == plus2 and back.utcoffset() == timedelta(0) and back.hour == 12
        finally:
            await engine.dispose()
    asyncio.run(go())


# -- worker leases (distributed mode) -------------------------------------------------------


@pytest_asyncio.fixture
async def both_store(database_url):
    engine = make_engine(database_url)
    yield JobStore(make_sessions(engine))
    await engine.dispose()


async def test_take_starts_a_prepared_job_and_a_takeover_is_one_more_attempt(both_store):
    store = both_store
    job = await new_job(store)
    assert await store.take(job.id, "w1/cpu") is None  # still queued: nothing to run
    claimed = await store.claim_next("bot")
    assert claimed.id == job.id and claimed.attempts == 1

    taken, lease = await store.take(job.id, "w1/cpu")
    assert taken.job_state is JobState.decoding and taken.worker == "w1/cpu"
    assert lease.attempt == 1  # the bot's claim counted this attempt already
    assert await store.transition(job.id, JobState.separating, lease=lease)

    # w1 goes silent; w2 takes the job over from where it was.
    taken2, lease2 = await store.take(job.id, "w2/cpu")
    assert taken2.job_state is JobState.decoding and lease2.attempt == 2

    # w1 wakes up: none of its writes land any more.
    assert not await store.update(job.id, lease=lease, in_state=JobState.decoding, progress=0.5)
    assert not await store.transition(job.id, JobState.separating, lease=lease)
    assert not await store.transition(job.id, JobState.failed, lease=lease, error="late")
    current = await store.get(job.id)
    assert current.job_state is JobState.decoding and current.progress == 0.0 and current.worker == "w2/cpu"

    # w2's run goes on.
    assert await store.transition(job.id, JobState.separating, lease=lease2)
    assert await store.update(job.id, lease=lease2, in_state=JobState.separating, progress=0.5)
    assert not await store.update(job.id, lease=lease2, in_state=JobState.encoding, progress=0.6)
    assert (await store.get(job.id)).progress == 0.5


async def test_take_refuses_a_cancelled_or_delivered_job(both_store):
    store = both_store
    for state in (JobState.cancelled, JobState.delivering, JobState.done, JobState.failed):
        job = await new_job(store)
        await force_state(store, job.id, state)
        assert await store.take(job.id, "w/cpu") is None
        assert (await store.get(job.id)).job_state is state


async def test_requeue_preparing_leaves_jobs_handed_to_the_queue(both_store):
    store = both_store
    preparing, handed, running = [await new_job(store) for _ in range(3)]
    for job in (preparing, handed, running):
        await force_state(store, job.id, JobState.fetching)
    await store.update(handed.id, queue_job_id=77)
    await store.update(running.id, state=JobState.separating.value, queue_job_id=78)

    assert await store.requeue_preparing() == [preparing.id]
    assert (await store.get(preparing.id)).job_state is JobState.queued
    assert (await store.get(handed.id)).job_state is JobState.fetching
    assert (await store.get(running.id)).job_state is JobState.separating


async def test_ending_a_job_forgets_its_presigned_urls(both_store):
    store = both_store
    job = await new_job(store)
    await force_state(store, job.id, JobState.fetching)
    await store.update(job.id, transfer={"input_url": "https://s3.example/x?X-Amz-Signature=secret"})
    assert await store.transition(job.id, JobState.failed, error="boom")
    assert (await store.get(job.id)).transfer is None


async def test_a_run_sees_only_its_columns_and_writes_only_its_own(both_store):
    """What a worker's run loads and writes is what its database role is granted
    (core.distributed.worker_role): the bot's columns stay out of its reach."""
    store = both_store
    job = await new_job(store, user_id=5, interaction_token="secret-token", token_expires_at=utcnow(),
                        status_message_id=1)
    await store.claim_next("bot")
    taken, lease = await store.take(job.id, "w/cpu")
    assert (taken.id, taken.model, taken.stems, taken.format, taken.source_name) == (job.id, "tiny", "all", "mp3",
                                                                                    "a.mp3")
    for bots in ("user_id", "source_url", "interaction"):
        with pytest.raises(SQLAlchemyError):  # not loaded: detached, or raiseload
            getattr(taken, bots)
    for field in ({"user_id": 6}, {"stems": "vocals"}, {"quota_state": "charged"}, {"transfer": None}):
        with pytest.raises(ValueError, match="a run may not write"):
            await store.update(job.id, lease=lease, **field)
        with pytest.raises(ValueError, match="a run may not write"):
            await store.transition(job.id, JobState.separating, lease=lease, **field)
    assert (await store.get(job.id)).user_id == 5


async def test_a_job_a_worker_ended_is_settled_by_the_bot(database_url):
    """A worker's store has no QuotaBook (its role may not touch quotas): the bot settles
    the job, frees its slot and drops its presigned URLs when it sees the end."""
    from core.jobs.quotas import Policy, QuotaBook

    engine = make_engine(database_url)
    try:
        sessions = make_sessions(engine)
        policy = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=1,
                        guild_queued_jobs=20, max_track_minutes=20)
        bot = JobStore(sessions, QuotaBook(sessions, policy))
        worker = JobStore(sessions)
        job, refusal = await bot.admit(policy, **FIELDS, user_id=9, guild_id=3)
        assert refusal is None
        await bot.claim_next("bot")
        await bot.reserve(job.id, 30.0)
        await bot.update(job.id, transfer={"input_url": "https://s3.example/x?X-Amz-Signature=secret"})
        _, lease = await worker.take(job.id, "w/cpu")
        assert await worker.transition(job.id, JobState.failed, lease=lease, error="boom", error_kind="error")
        ended = await bot.get(job.id)
        assert (ended.quota_state, ended.slot_state, ended.transfer is not None) == ("reserved", "held", True)
        assert (await bot.admit(policy, **FIELDS, user_id=9, guild_id=3))[0] is None  # its slot is still held

        assert await bot.settle_finished() == [job.id]  # the sweeper does it too, should the bot miss it
        settled = await bot.get(job.id)
        assert (settled.quota_state, settled.slot_state, settled.transfer) == ("released", "released", None)
        assert await bot.settle_finished() == []  # once
        assert (await bot.admit(policy, **FIELDS, user_id=9, guild_id=3))[0] is not None
    finally:
        await engine.dispose()


async def test_a_worker_store_refuses_a_track_too_long_but_reserves_nothing(both_store):
    store = both_store
    job = await new_job(store, limits={"max_track_s": 60.0})
    await store.reserve(job.id, 59.0)
    with pytest.raises(TooLongError):
        await store.reserve(job.id, 61.0)
    assert (await store.get(job.id)).quota_state == "none"


async def test_a_run_may_name_updated_at_in_a_guarded_update(store):
    """A guarded update that names updated_at itself writes it. It raised TypeError, which
    broke a run whose hand-over of its results got no answer (the connection dropped after
    the commit): JobRunner._deliver checks that its job is `delivering` with such a write."""
    job = await new_job(store)
    await store.claim_next("bot")
    taken = await store.take(job.id, "w1")
    assert taken is not None
    _, lease = taken
    for state in (JobState.separating, JobState.encoding, JobState.delivering):
        assert await store.transition(job.id, state, lease=lease)
    when = utcnow() - timedelta(seconds=5)
    assert await store.update(job.id, lease=lease, in_state=JobState.delivering, updated_at=when)
    assert (await store.require(job.id)).updated_at == when
    assert await store.transition(job.id, JobState.failed, error="stopped by the operator")
    assert not await store.update(job.id, lease=lease, in_state=JobState.delivering, updated_at=when)


# -- the results cache and render options ----------------------------------------------------


async def test_the_cache_serves_only_a_job_rendered_the_same_way(store):
    """A plain split is never served for a request at 80% speed, nor a mix for a split of the
    same stems; the same options are."""
    slow = RenderOptions(tempo=80).to_column()
    mix = RenderOptions(mix=(("bass", 100), ("vocals", 50))).to_column()
    served = {}
    for options in ("", slow, mix):
        job = await new_job(store, input_sha256="f" * 64, stems="bass,vocals", render_options=options)
        await store.update(job.id, state=JobState.done.value, artifacts={"files": {}})
        served[options] = job.id
    for options in ("", slow, mix, RenderOptions(tempo=80, transpose=1).to_column()):
        asking = await new_job(store, input_sha256="f" * 64, stems="bass,vocals", render_options=options)
        found = await store.find_cached(asking)
        assert (found.id if found else None) == served.get(options), options
    # A job made without the option (older code, or the CLI) is a plain one.
    assert (await store.find_cached(await new_job(store, input_sha256="f" * 64, stems="bass,vocals"))).id == \
        served[""]


async def test_the_cache_tells_a_chain_from_its_first_model_alone(store):
    """A `/split clean:` job (htdemucs, then a cleaning model on its vocals) is never served
    htdemucs's own stems, nor another cleaning model's, and a plain job never a chain's."""
    served = {}
    for clean in (None, "dereverb", "denoise"):
        job = await new_job(store, input_sha256="c" * 64, clean_model=clean)
        await store.update(job.id, state=JobState.done.value, artifacts={"files": {}})
        served[clean] = job.id
    for clean in (None, "dereverb", "denoise"):
        found = await store.find_cached(await new_job(store, input_sha256="c" * 64, clean_model=clean))
        assert found is not None and found.id == served[clean], clean
