"""core.jobs.quotas with core.jobs.store: policies, slots and minutes that cannot be overrun, on a
real SQLite file and a real PostgreSQL server (the `database_url` fixture)."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

import core.jobs.quotas as quotas
from core.errors import TooLongError
from core.jobs.job import JobState
from core.jobs.quotas import (
    DM,
    SERVER,
    GuildPolicy,
    Policy,
    QuotaExceeded,
    RoleTier,
    effective_policy,
    next_reset,
    utc_day,
)
from tests.support.quota_db import FIELDS, admit, open_db

G = 5  # the server of most tests

DEFAULTS = Policy(user_minutes_per_day=30.0, guild_minutes_per_day=120.0, user_concurrent_jobs=2,
                  guild_queued_jobs=10, max_track_minutes=15.0)


async def start(store, job_id: int) -> None:
    """Claim the (only) queued job: it is then fetching, as when its length is probed."""
    claimed = await store.claim_next("w")
    assert claimed is not None and claimed.id == job_id


async def deliver(store, job_id: int, **fields) -> None:
    for state in (JobState.decoding, JobState.separating, JobState.encoding):
        assert await store.transition(job_id, state)
    assert await store.transition(job_id, JobState.delivering, **fields)


# -- effective_policy ------------------------------------------------------------------------


def test_defaults_apply_without_server_settings():
    assert effective_policy(DEFAULTS, None) == DEFAULTS
    # An empty settings row (every field NULL) is "the bot's default" too.
    assert effective_policy(DEFAULTS, GuildPolicy(guild_id=G)) == DEFAULTS
    assert DEFAULTS.as_limits() == {"user_s": 1800.0, "guild_s": 7200.0, "max_track_s": 900.0}


def test_server_settings_override_defaults():
    guild = GuildPolicy(guild_id=G, user_minutes_per_day=10.0, guild_minutes_per_day=500.0, user_concurrent_jobs=1,
                        guild_queued_jobs=3, max_track_minutes=5.0, links_allowed=False,
                        default_model="htdemucs_ft", default_format="flac")
    policy = effective_policy(DEFAULTS, guild)
    assert (policy.user_minutes_per_day, policy.guild_minutes_per_day, policy.user_concurrent_jobs,
            policy.guild_queued_jobs, policy.max_track_minutes) == (10.0, 500.0, 1, 3, 5.0)
    assert policy.links_allowed is False
    assert (policy.default_model, policy.default_format) == ("htdemucs_ft", "flac")
    assert policy.as_limits() == {"user_s": 600.0, "guild_s": 30000.0, "max_track_s": 300.0}
    # Only what the server set changes.
    partial = effective_policy(DEFAULTS, GuildPolicy(guild_id=G, user_concurrent_jobs=4))
    assert partial == Policy(30.0, 120.0, 4, 10, 15.0)


def test_allowed_lists_are_parsed():
    guild = GuildPolicy(guild_id=G, allowed_models=" htdemucs , mdx_extra,,", allowed_formats="mp3,flac",
                        allowed_channels="111, 222 ,333")
    policy = effective_policy(DEFAULTS, guild)
    assert policy.allowed_models == ("htdemucs", "mdx_extra")
    assert policy.allowed_formats == ("mp3", "flac")
    assert policy.allowed_channels == (111, 222, 333)
    assert all(isinstance(c, int) for c in policy.allowed_channels)
    # NULL means "all"; an empty channel list means "all" too.
    assert effective_policy(DEFAULTS, GuildPolicy(guild_id=G, allowed_channels="")).allowed_channels is None
    none = effective_policy(DEFAULTS, GuildPolicy(guild_id=G))
    assert (none.allowed_models, none.allowed_formats, none.allowed_channels) == (None, None, None)


def test_role_tiers_raise_user_limits_and_the_largest_wins():
    guild = GuildPolicy(guild_id=G, user_minutes_per_day=20.0, user_concurrent_jobs=2, max_track_minutes=10.0)
    small = RoleTier(guild_id=G, role_id=1, user_minutes_per_day=60.0, user_concurrent_jobs=3)
    large = RoleTier(guild_id=G, role_id=2, user_minutes_per_day=90.0, max_track_minutes=30.0)
    for tiers in ([small, large], [large, small]):  # order does not matter
        policy = effective_policy(DEFAULTS, guild, tiers)
        assert policy.user_minutes_per_day == 90.0
        assert policy.user_concurrent_jobs == 3
        assert policy.max_track_minutes == 30.0
        # Tiers are about members: the server's own limits stay.
        assert policy.guild_minutes_per_day == DEFAULTS.guild_minutes_per_day
        assert policy.guild_queued_jobs == DEFAULTS.guild_queued_jobs


def test_role_tiers_never_lower_a_limit():
    guild = GuildPolicy(guild_id=G, user_minutes_per_day=20.0, user_concurrent_jobs=4, max_track_minutes=10.0)
    stingy = RoleTier(guild_id=G, role_id=1, user_minutes_per_day=5.0, user_concurrent_jobs=1,
                      max_track_minutes=2.0)
    empty = RoleTier(guild_id=G, role_id=2)
    policy = effective_policy(DEFAULTS, guild, [stingy, empty])
    assert (policy.user_minutes_per_day, policy.user_concurrent_jobs, policy.max_track_minutes) == (20.0, 4, 10.0)
    # Without server settings a tier raises the defaults.
    raised = effective_policy(DEFAULTS, None, [RoleTier(guild_id=G, role_id=3, user_concurrent_jobs=9)])
    assert raised.user_concurrent_jobs == 9 and raised.user_minutes_per_day == DEFAULTS.user_minutes_per_day


async def test_quota_book_policy_reads_server_settings_and_member_tiers(db):
    book = db.store(DEFAULTS).quotas
    assert await book.policy(G) == DEFAULTS
    assert await book.policy(None, [1, 2]) == DEFAULTS  # DMs: defaults, tiers are per server
    await book.set_guild(G, user_minutes_per_day=10.0, allowed_models="htdemucs")
    await book.set_tier(G, 1, user_minutes_per_day=45.0)
    await book.set_tier(G, 2, user_minutes_per_day=25.0, user_concurrent_jobs=5)
    await book.set_tier(G + 1, 3, user_minutes_per_day=999.0)  # another server's role

    plain = await book.policy(G)
    assert plain.user_minutes_per_day == 10.0 and plain.allowed_models == ("htdemucs",)
    member = await book.policy(G, [1, 2, 3])
    assert (member.user_minutes_per_day, member.user_concurrent_jobs) == (45.0, 5)
    assert (await book.policy(G, [2])).user_minutes_per_day == 25.0
    assert await book.remove_tier(G, 1)
    assert not await book.remove_tier(G, 1)
    assert (await book.policy(G, [1, 2])).user_minutes_per_day == 25.0
    with pytest.raises(ValueError):
        await book.set_guild(G, no_such_setting=1)


# -- admission race --------------------------------------------------------------------------


async def test_fifty_concurrent_admissions_from_one_user_admit_exactly_the_limit(wide):
    policy = Policy(60.0, 600.0, user_concurrent_jobs=3, guild_queued_jobs=100, max_track_minutes=30.0)
    gate = wide.gate(50)
    store = wide.store(policy, sessions=gate)
    results = await asyncio.gather(*(
        store.admit(policy, **{**FIELDS, "source_name": f"t{k}.mp3"}, user_id=7, guild_id=G) for k in range(50)))
    assert gate.peak == 50  # all 50 held a connection at the same time

    admitted = [job for job, refusal in results if job is not None]
    refusals = [refusal for job, refusal in results if job is None]
    assert len(admitted) == 3 and len(refusals) == 47
    assert set(refusals) == {"you already have 3 job(s) in progress; wait for one to finish"}
    assert all(refusal is None for job, refusal in results if job is not None)

    rows = await wide.jobs()
    assert sorted(r.id for r in rows) == sorted(j.id for j in admitted)
    assert all(r.slot_state == "held" and r.state == "queued" for r in rows)
    assert all(r.limits == policy.as_limits() for r in rows)
    assert await wide.slots() == {(G, 7): 3, (G, SERVER): 3}


async def test_fifty_concurrent_admissions_from_different_users_fill_the_server_queue(wide):
    policy = Policy(60.0, 600.0, user_concurrent_jobs=3, guild_queued_jobs=5, max_track_minutes=30.0)
    gate = wide.gate(50)
    store = wide.store(policy, sessions=gate)
    results = await asyncio.gather(*(
        store.admit(policy, **FIELDS, user_id=100 + k, guild_id=G) for k in range(50)))
    assert gate.peak == 50

    admitted = [job for job, _ in results if job is not None]
    refusals = [refusal for job, refusal in results if job is None]
    assert len(admitted) == 5 and len(refusals) == 45
    assert set(refusals) == {"this server's queue is full (5 jobs); try again in a few minutes"}

    slots = await wide.slots()
    assert slots[(G, SERVER)] == 5
    users = {key: n for key, n in slots.items() if key[1] != SERVER}
    # A refused user's counter increment was rolled back with the refusal.
    assert {key for key, n in users.items() if n} == {(G, job.user_id) for job in admitted}
    assert all(n in (0, 1) for n in users.values()) and sum(users.values()) == 5
    assert len(await wide.jobs()) == 5


async def test_a_full_server_queue_does_not_block_other_servers_and_frees_with_a_job(db):
    policy = Policy(60.0, 600.0, user_concurrent_jobs=1, guild_queued_jobs=1, max_track_minutes=30.0)
    store = db.store(policy)
    first = await admit(store, policy, user_id=1, guild_id=G)
    job, refusal = await store.admit(policy, **FIELDS, user_id=2, guild_id=G)
    assert job is None and "queue is full" in refusal
    await admit(store, policy, user_id=2, guild_id=G + 1)  # another server
    await admit(store, policy, user_id=3, guild_id=None)  # a DM counts under guild 0
    # (A refused user may be left with a counter at 0: only SQLite keeps the new row.)
    assert {key: n for key, n in (await db.slots()).items() if n} == {
        (G, 1): 1, (G, SERVER): 1, (G + 1, 2): 1, (G + 1, SERVER): 1, (DM, 3): 1, (DM, SERVER): 1}
    assert await store.request_cancel(first.id) is JobState.cancelled
    await admit(store, policy, user_id=2, guild_id=G)
    assert (await db.slots())[(G, SERVER)] == 1


# -- minutes race ----------------------------------------------------------------------------


async def _reserve_race(db, user_ids: list[int], policy: Policy) -> tuple[list, list]:
    plain = db.store(policy)
    jobs = [await admit(plain, policy, user_id=u, guild_id=G) for u in user_ids]
    gate = db.gate(len(jobs))
    store = db.store(policy, sessions=gate)
    results = await asyncio.gather(*(store.reserve(job.id, 60.0) for job in jobs), return_exceptions=True)
    assert gate.peak == len(jobs)
    ok = [job for job, result in zip(jobs, results, strict=True) if result is None]
    refused = [result for result in results if result is not None]
    return ok, refused


async def test_fifty_concurrent_reservations_of_one_user_never_exceed_the_minutes(wide):
    policy = Policy(user_minutes_per_day=10.0, guild_minutes_per_day=1000.0, user_concurrent_jobs=100,
                    guild_queued_jobs=100, max_track_minutes=30.0)
    ok, refused = await _reserve_race(wide, [7] * 50, policy)
    assert len(ok) == 10 and len(refused) == 40
    assert all(isinstance(exc, QuotaExceeded) for exc in refused), refused
    assert all("your daily allowance has 0.0 min left" in exc.reason for exc in refused)

    today = utc_day()
    assert await wide.usage() == {(G, 7, today): (0.0, 600.0), (G, SERVER, today): (0.0, 600.0)}
    rows = await wide.jobs()
    reserved = [r for r in rows if r.quota_state == "reserved"]
    assert sorted(r.id for r in reserved) == sorted(j.id for j in ok)
    assert all(r.reserved_s == 60.0 and r.quota_day == today for r in reserved)
    # The refused ones reserved nothing (their job row change was rolled back too).
    assert all(r.reserved_s == 0.0 and r.quota_day is None for r in rows if r.quota_state == "none")


async def test_fifty_concurrent_reservations_of_different_users_never_exceed_the_server(wide):
    policy = Policy(user_minutes_per_day=100.0, guild_minutes_per_day=10.0, user_concurrent_jobs=100,
                    guild_queued_jobs=100, max_track_minutes=30.0)
    ok, refused = await _reserve_race(wide, list(range(100, 150)), policy)
    assert len(ok) == 10 and len(refused) == 40
    assert all(isinstance(exc, QuotaExceeded) for exc in refused), refused
    assert all("this server's daily allowance has 0.0 min left" in exc.reason for exc in refused)

    today = utc_day()
    usage = await wide.usage()
    assert usage[(G, SERVER, today)] == (0.0, 600.0)
    users = {key: value for key, value in usage.items() if key[1] != SERVER}
    assert {key[1] for key, (_, reserved) in users.items() if reserved} == {job.user_id for job in ok}
    assert all(value in ((0.0, 60.0), (0.0, 0.0)) for value in users.values())


async def test_a_refused_reservation_says_what_is_left(db):
    policy = Policy(10.0, 1000.0, 10, 100, 30.0)
    store = db.store(policy)
    a, b = await admit(store, policy), await admit(store, policy)
    await store.reserve(a.id, 7.5 * 60)
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(b.id, 3 * 60)
    assert refused.value.reason == ("this track is 3.0 min but your daily allowance has 2.5 min left "
                                    "(resets at 00:00 UTC)")
    assert refused.value.kind == "quota_exceeded"
    await store.reserve(b.id, 2.5 * 60)  # exactly what is left fits
    assert (await db.usage())[(G, 1, utc_day())] == (0.0, 600.0)


# -- settling --------------------------------------------------------------------------------


async def test_a_delivered_job_is_charged_once_despite_duplicate_endings(db):
    store = db.store()
    job = await admit(store, user_id=1)
    other = await admit(store, user_id=1)  # holds the user's second slot throughout
    await start(store, job.id)
    await store.reserve(job.id, 120.0)
    await deliver(store, job.id)

    results = await asyncio.gather(*(store.transition(job.id, JobState.done) for _ in range(5)),
                                   store.settle_finished(), store.settle_finished())
    assert sum(r is True for r in results[:5]) == 1
    assert await store.transition(job.id, JobState.done) is False
    assert await store.settle_finished() == []

    today = utc_day()
    assert await db.usage() == {(G, 1, today): (120.0, 0.0), (G, SERVER, today): (120.0, 0.0)}
    done = await store.get(job.id)
    assert (done.quota_state, done.slot_state) == ("charged", "released")
    # One slot released, not two: the other job still counts.
    assert await db.slots() == {(G, 1): 1, (G, SERVER): 1}
    assert (await store.get(other.id)).slot_state == "held"


async def test_settle_finished_charges_a_job_ended_behind_the_stores_back_only_once(db):
    store = db.store()
    job = await admit(store)
    await start(store, job.id)
    await store.reserve(job.id, 90.0)
    await db.sql("UPDATE jobs SET state = 'done' WHERE id = :id", id=job.id)
    assert await store.settle_finished() == [job.id]
    assert await store.settle_finished() == []
    assert await store.transition(job.id, JobState.done) is False
    assert (await db.usage())[(G, 1, utc_day())] == (90.0, 0.0)
    assert await db.slots() == {(G, 1): 0, (G, SERVER): 0}


@pytest.mark.parametrize("end", [JobState.failed, JobState.cancelled])
async def test_failed_or_cancelled_jobs_release_their_minutes_and_slot(db, end):
    store = db.store()
    job = await admit(store)
    await start(store, job.id)
    await store.reserve(job.id, 300.0)
    today = utc_day()
    assert (await db.usage())[(G, 1, today)] == (0.0, 300.0)
    assert await db.slots() == {(G, 1): 1, (G, SERVER): 1}

    results = await asyncio.gather(*(store.transition(job.id, end) for _ in range(4)), store.settle_finished())
    assert sum(r is True for r in results[:4]) == 1
    assert await db.usage() == {(G, 1, today): (0.0, 0.0), (G, SERVER, today): (0.0, 0.0)}
    assert await db.slots() == {(G, 1): 0, (G, SERVER): 0}
    row = await store.get(job.id)
    assert (row.state, row.quota_state, row.slot_state) == (end.value, "released", "released")


async def test_a_cache_hit_costs_no_minutes(db):
    store = db.store()
    # Reserved before the cache was found (e.g. a retry): the reservation is dropped.
    reserved = await admit(store)
    await start(store, reserved.id)
    await store.reserve(reserved.id, 200.0)
    assert await store.transition(reserved.id, JobState.delivering, cache_hit=True)
    assert await store.transition(reserved.id, JobState.done)
    # Served from the cache right after download: nothing was reserved, nothing is used.
    plain = await admit(store)
    await start(store, plain.id)
    assert await store.transition(plain.id, JobState.delivering, cache_hit=True)
    assert await store.transition(plain.id, JobState.done)

    today = utc_day()
    assert await db.usage() == {(G, 1, today): (0.0, 0.0), (G, SERVER, today): (0.0, 0.0)}
    assert (await store.get(reserved.id)).quota_state == "released"
    assert (await store.get(plain.id)).quota_state == "none"
    assert await db.slots() == {(G, 1): 0, (G, SERVER): 0}
    assert await store.settle_finished() == []


async def test_a_slot_counter_never_goes_negative(db):
    store = db.store()
    job = await admit(store)
    await db.sql("UPDATE quota_slots SET active = 0")  # drifted low (hand edit, old crash)
    assert await store.transition(job.id, JobState.failed)
    assert await db.slots() == {(G, 1): 0, (G, SERVER): 0}
    assert (await store.get(job.id)).slot_state == "released"


async def test_reserving_for_a_job_that_already_ended_reserves_nothing(db):
    """A user cancels while the track downloads; the worker then probes it and reserves."""
    store = db.store()
    job = await admit(store)
    await start(store, job.id)
    assert await store.request_cancel(job.id) is JobState.cancelled
    await store.reserve(job.id, 120.0)  # neither raises nor reserves
    row = await store.get(job.id)
    assert (row.quota_state, row.reserved_s) == ("none", 0.0)
    assert all(reserved == 0.0 for _, reserved in (await db.usage()).values())
    assert await store.settle_finished() == []


async def test_cancel_racing_the_reservation_never_leaves_minutes_reserved(wide):
    store = wide.store()
    jobs = [await admit(store, user_id=1) for _ in range(10)]
    for job in jobs:
        await store.update(job.id, state=JobState.fetching.value)
    gate = wide.gate(20)
    racing = wide.store(sessions=gate)
    await asyncio.gather(*(racing.request_cancel(job.id) for job in jobs),
                         *(racing.reserve(job.id, 60.0) for job in jobs))
    rows = await wide.jobs()
    assert all(r.state == "cancelled" and r.slot_state == "released" for r in rows)
    # Reserved before the cancel (then released by it), or not at all.
    assert all(r.quota_state in ("released", "none") for r in rows)
    assert all(used == 0.0 and reserved == 0.0 for used, reserved in (await wide.usage()).values())
    assert await store.settle_finished() == []
    assert await wide.slots() == {(G, 1): 0, (G, SERVER): 0}


# -- retries ---------------------------------------------------------------------------------


async def test_a_retried_job_keeps_its_one_reservation(db):
    store = db.store()
    job = await admit(store)
    await start(store, job.id)
    await store.reserve(job.id, 90.0)
    today = utc_day()

    assert await store.requeue_running() == [job.id]  # the process died
    await start(store, job.id)
    await store.reserve(job.id, 90.0)
    assert (await db.usage())[(G, 1, today)] == (0.0, 90.0)

    assert await store.transition(job.id, JobState.queued)  # a retry after a transient error
    await start(store, job.id)
    await store.reserve(job.id, 95.0)  # even a different length keeps the first reservation
    assert await db.usage() == {(G, 1, today): (0.0, 90.0), (G, SERVER, today): (0.0, 90.0)}
    row = await store.get(job.id)
    assert (row.attempts, row.quota_state, row.reserved_s) == (3, "reserved", 90.0)
    assert await db.slots() == {(G, 1): 1, (G, SERVER): 1}  # still one slot

    await deliver(store, job.id)
    assert await store.transition(job.id, JobState.done)
    assert await db.usage() == {(G, 1, today): (90.0, 0.0), (G, SERVER, today): (90.0, 0.0)}
    assert await db.slots() == {(G, 1): 0, (G, SERVER): 0}


# -- too long --------------------------------------------------------------------------------


async def test_a_track_longer_than_the_server_allows_is_refused_and_reserves_nothing(db):
    policy = Policy(600.0, 6000.0, 10, 100, max_track_minutes=10.0)
    store = db.store(policy)
    job = await admit(store, policy)
    await start(store, job.id)
    with pytest.raises(TooLongError) as refused:
        await store.reserve(job.id, 601.0)
    assert refused.value.reason == "the track is 10:01 long; this server allows up to 10:00"
    assert refused.value.kind == "too_long"
    row = await store.get(job.id)
    assert (row.quota_state, row.reserved_s, row.quota_day) == ("none", 0.0, None)
    assert all(reserved == 0.0 for _, reserved in (await db.usage()).values())
    # Exactly the longest allowed is fine.
    await store.reserve(job.id, 600.0)
    assert (await db.usage())[(G, 1, utc_day())] == (0.0, 600.0)


# -- calendar days ---------------------------------------------------------------------------


def test_utc_day_and_next_reset():
    new_york = timezone(timedelta(hours=-5))
    late_evening = datetime(2030, 1, 1, 23, 30, tzinfo=new_york)  # already Jan 2 in UTC
    assert utc_day(late_evening) == date(2030, 1, 2)
    assert next_reset(late_evening) == datetime(2030, 1, 3, tzinfo=UTC)
    midnight = datetime(2030, 3, 31, 0, 0, tzinfo=UTC)
    assert utc_day(midnight) == date(2030, 3, 31)
    assert next_reset(midnight) == datetime(2030, 4, 1, tzinfo=UTC)
    last_second = datetime(2030, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert next_reset(last_second) == datetime(2031, 1, 1, tzinfo=UTC)
    tokyo = timezone(timedelta(hours=9))
    assert utc_day(datetime(2030, 6, 1, 8, 0, tzinfo=tokyo)) == date(2030, 5, 31)
    now = datetime.now(UTC)
    assert utc_day() == now.date() or utc_day() == (now + timedelta(seconds=5)).date()
    reset = next_reset()
    assert reset.tzinfo is not None and reset.utcoffset() == timedelta(0)
    assert (reset.hour, reset.minute, reset.second) == (0, 0, 0)
    assert timedelta(0) < reset - now <= timedelta(days=1)


async def test_quota_status_shows_minutes_left_and_active_jobs(db):
    policy = Policy(user_minutes_per_day=10.0, guild_minutes_per_day=30.0, user_concurrent_jobs=5,
                    guild_queued_jobs=50, max_track_minutes=30.0)
    store = db.store(policy)
    book = store.quotas
    empty = await book.status(G, 1, policy)
    assert (empty.user_left_s, empty.guild_left_s, empty.user_active, empty.guild_active) == (600.0, 1800.0, 0, 0)
    assert empty.day == utc_day() and empty.resets_at == next_reset()

    delivered = await admit(store, policy, user_id=1)
    await start(store, delivered.id)
    await store.reserve(delivered.id, 60.0)
    await deliver(store, delivered.id)
    assert await store.transition(delivered.id, JobState.done)
    running = await admit(store, policy, user_id=1)
    await start(store, running.id)
    await store.reserve(running.id, 120.0)
    await admit(store, policy, user_id=1)  # queued, length not known yet
    neighbour = await admit(store, policy, user_id=2)
    await start(store, neighbour.id)
    await store.reserve(neighbour.id, 300.0)

    mine = await book.status(G, 1, policy)
    assert (mine.user_used_s, mine.user_reserved_s) == (60.0, 120.0)
    assert mine.user_left_s == 420.0  # 7 of 10 minutes left
    assert (mine.guild_used_s, mine.guild_reserved_s) == (60.0, 420.0)
    assert mine.guild_left_s == 1320.0
    assert (mine.user_active, mine.guild_active) == (2, 3)
    theirs = await book.status(G, 2, policy)
    assert (theirs.user_left_s, theirs.user_active, theirs.guild_active) == (300.0, 1, 3)
    # DMs count under guild 0, apart from every server.
    dm = await book.status(None, 1, policy)
    assert (dm.user_left_s, dm.guild_left_s, dm.user_active) == (600.0, 1800.0, 0)


async def test_yesterdays_minutes_do_not_count_today(db, monkeypatch):
    policy = Policy(user_minutes_per_day=10.0, guild_minutes_per_day=30.0, user_concurrent_jobs=5,
                    guild_queued_jobs=50, max_track_minutes=30.0)
    store = db.store(policy)
    today = utc_day()
    yesterday = today - timedelta(days=1)
    job = await admit(store, policy)
    await start(store, job.id)
    monkeypatch.setattr(quotas, "utc_day", lambda moment=None: yesterday)
    await store.reserve(job.id, 600.0)  # yesterday's whole allowance
    monkeypatch.undo()
    # Delivered after midnight: charged to the day it was reserved on.
    await deliver(store, job.id)
    assert await store.transition(job.id, JobState.done)
    assert await db.usage() == {(G, 1, yesterday): (600.0, 0.0), (G, SERVER, yesterday): (600.0, 0.0)}

    status = await store.quotas.status(G, 1, policy)
    assert (status.user_used_s, status.user_left_s, status.day) == (0.0, 600.0, today)
    fresh = await admit(store, policy)
    await start(store, fresh.id)
    await store.reserve(fresh.id, 600.0)  # today's allowance is whole
    assert (await db.usage())[(G, 1, today)] == (0.0, 600.0)


# -- reconciling ---------------------------------------------------------------------------


async def test_reconcile_slots_fixes_a_corrupted_counter_and_keeps_correct_ones(db):
    store = db.store()
    for user in (1, 1, 2):
        await admit(store, user_id=user, guild_id=G)
    ended = await admit(store, user_id=3, guild_id=G)
    assert await store.transition(ended.id, JobState.failed)
    await admit(store, user_id=4, guild_id=G + 1)
    await admit(store, user_id=5, guild_id=None)
    correct = await db.slots()
    assert correct == {(G, 1): 2, (G, 2): 1, (G, 3): 0, (G, SERVER): 3, (G + 1, 4): 1, (G + 1, SERVER): 1,
                       (DM, 5): 1, (DM, SERVER): 1}

    await store.reconcile_slots()
    assert await db.slots() == correct  # nothing to fix: nothing changes

    await db.sql("UPDATE quota_slots SET active = 99 WHERE guild_id = :g AND user_id = :u", g=G, u=1)
    await db.sql("UPDATE quota_slots SET active = 7 WHERE guild_id = :g AND user_id = :u", g=G, u=3)
    await db.sql("DELETE FROM quota_slots WHERE guild_id = :g AND user_id = :u", g=G + 1, u=4)
    broken = await db.slots()
    assert broken[(G, 1)] == 99 and (G + 1, 4) not in broken
    await store.reconcile_slots()
    assert await db.slots() == correct

    # The user can use the slots again that the bad counter had taken.
    policy = Policy(600.0, 6000.0, user_concurrent_jobs=3, guild_queued_jobs=100, max_track_minutes=60.0)
    await admit(store, policy, user_id=1, guild_id=G)
    job, refusal = await store.admit(policy, **FIELDS, user_id=1, guild_id=G)
    assert job is None and "3 job(s)" in refusal
    assert (await db.slots())[(G, 1)] == 3



async def test_an_admission_during_reconcile_is_not_lost(database_url):
    """reconcile_slots counts, then writes the counts: an admission that commits in between
    must not be overwritten by the older count (or a user gets one job more than allowed)."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from core.db import make_engine

    admitted = []

    class CountHook(AsyncSession):
        """Runs an admission elsewhere right after the reconcile's count query."""

        async def execute(self, statement, *args, **kwargs):
            result = await super().execute(statement, *args, **kwargs)
            if "count(" in str(statement) and "slot_state" in str(statement) and not admitted:
                admitted.append(asyncio.create_task(admit(other, user_id=1)))
                await asyncio.sleep(0.5)  # time for it to commit, unless reconcile blocks it
            return result

    async with open_db(database_url) as db:
        other = db.store()
        await admit(other, user_id=1)
        await db.sql("UPDATE quota_slots SET active = 5")  # drifted: reconcile has work to do
        engine = make_engine(database_url)
        try:
            hooked = db.store(sessions=async_sessionmaker(engine, class_=CountHook, expire_on_commit=False))
            await hooked.reconcile_slots()
            await asyncio.wait_for(admitted[0], 30)
        finally:
            await engine.dispose()
        assert await db.slots() == {(G, 1): 2, (G, SERVER): 2}



async def _admit_pausing_after_the_user_slot(db, user_id: int, meanwhile) -> None:
    """Admit a job that, holding the user's slot counter (locked) but not yet the server's,
    starts `meanwhile()` and gives it half a second to take the locks it can; then wait for
    both. Whoever locks counters in another order than user-then-server deadlocks here."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from core.db import make_engine

    started = []

    class PauseAfterUserSlot(AsyncSession):
        async def execute(self, statement, *args, **kwargs):
            result = await super().execute(statement, *args, **kwargs)
            sql = str(statement)
            if sql.startswith("UPDATE quota_slots") and "active <" in sql and not started:
                started.append(asyncio.create_task(meanwhile()))
                await asyncio.sleep(0.5)
            return result

    engine = make_engine(db.url)
    try:
        paused = db.store(sessions=async_sessionmaker(engine, class_=PauseAfterUserSlot, expire_on_commit=False))
        await admit(paused, user_id=user_id)
        assert started, "the admission did not take a slot"
        await asyncio.wait_for(started[0], 30)
    finally:
        await engine.dispose()


async def test_reconcile_and_an_admission_lock_counters_in_the_same_order(db):
    store = db.store()
    await admit(store, user_id=1)
    second = await admit(store, user_id=2)
    assert await store.transition(second.id, JobState.failed)
    # Move user 2's counter behind the server's in the table (a scan meets it last).
    await db.sql("UPDATE quota_slots SET active = active WHERE user_id = 2")
    await _admit_pausing_after_the_user_slot(db, 2, lambda: db.store().reconcile_slots())
    assert await db.slots() == {(G, 1): 1, (G, 2): 1, (G, SERVER): 2}


async def test_settling_several_jobs_and_an_admission_do_not_deadlock(db):
    store = db.store()
    first, second = await admit(store, user_id=1), await admit(store, user_id=2)
    for job in (first, second):
        await db.sql("UPDATE jobs SET state = 'failed' WHERE id = :id", id=job.id)
    settled = []

    async def sweep():
        settled.extend(await db.store().settle_finished())

    await _admit_pausing_after_the_user_slot(db, 2, sweep)
    assert sorted(settled) == sorted([first.id, second.id])
    assert await db.slots() == {(G, 1): 0, (G, 2): 1, (G, SERVER): 1}
