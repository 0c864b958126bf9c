"""The operator's ceilings (core.jobs.quotas.Ceilings) and the counters across servers, on a
real SQLite file and a real PostgreSQL server: no server setting or role tier goes above a
ceiling, and a member in several servers (and DMs) has one allowance, not one per server,
however many requests arrive at once."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db import make_engine
from core.jobs.job import JobState
from core.jobs.quotas import (
    ACROSS_SERVERS,
    DM,
    EVERY_SERVER,
    SERVER,
    Ceilings,
    GuildPolicy,
    Policy,
    QuotaExceeded,
    RoleTier,
    effective_policy,
    utc_day,
)
from core.runtime import ceilings_of, default_policy
from core.settings import Settings
from tests.support.quota_db import FIELDS, admit

G = 5  # the server of most tests; G + k are others

DEFAULTS = Policy(user_minutes_per_day=30.0, guild_minutes_per_day=120.0, user_concurrent_jobs=2,
                  guild_queued_jobs=10, max_track_minutes=15.0)
CEILINGS = Ceilings(user_minutes_per_day=60.0, guild_minutes_per_day=300.0, user_concurrent_jobs=3,
                    guild_queued_jobs=12, max_track_minutes=20.0, total_queued_jobs=50)
# Ceilings far above every test's policy: the counters across servers, and nothing else.
ROOMY_CEILINGS = Ceilings(user_minutes_per_day=10_000.0, guild_minutes_per_day=100_000.0, user_concurrent_jobs=1000,
                          guild_queued_jobs=10_000, max_track_minutes=600.0, total_queued_jobs=10_000)


# -- the policy in force -----------------------------------------------------------------------


def test_no_server_setting_or_role_tier_goes_above_a_ceiling():
    unlimited = GuildPolicy(guild_id=G, user_minutes_per_day=1e9, guild_minutes_per_day=1e9,
                            user_concurrent_jobs=10**6, guild_queued_jobs=10**6, max_track_minutes=1e6,
                            streaming_links_allowed=True)
    tier = RoleTier(guild_id=G, role_id=1, user_minutes_per_day=1e9, user_concurrent_jobs=999,
                    max_track_minutes=999.0)
    policy = effective_policy(DEFAULTS, unlimited, [tier], CEILINGS)
    assert (policy.user_minutes_per_day, policy.guild_minutes_per_day, policy.user_concurrent_jobs,
            policy.guild_queued_jobs, policy.max_track_minutes) == (60.0, 300.0, 3, 12, 20.0)
    assert isinstance(policy.user_concurrent_jobs, int) and isinstance(policy.guild_queued_jobs, int)
    assert policy.as_limits() == {"user_s": 3600.0, "guild_s": 18000.0, "max_track_s": 1200.0}

    # Under the ceilings a server's choice and a tier's raise stand.
    modest = GuildPolicy(guild_id=G, user_minutes_per_day=10.0, user_concurrent_jobs=1, max_track_minutes=5.0)
    raised = RoleTier(guild_id=G, role_id=2, user_minutes_per_day=45.0)
    assert effective_policy(DEFAULTS, modest, [], CEILINGS).user_minutes_per_day == 10.0
    assert effective_policy(DEFAULTS, modest, [raised], CEILINGS).user_minutes_per_day == 45.0
    assert effective_policy(DEFAULTS, None, [], CEILINGS) == DEFAULTS  # defaults under the ceilings
    # Defaults above a ceiling are held to it too (an operator who raised only the defaults).
    generous = Policy(user_minutes_per_day=500.0, guild_minutes_per_day=120.0, user_concurrent_jobs=9,
                      guild_queued_jobs=10, max_track_minutes=15.0)
    held = effective_policy(generous, None, [], CEILINGS)
    assert (held.user_minutes_per_day, held.user_concurrent_jobs) == (60.0, 3)


def test_links_the_operator_turned_off_stay_off_whatever_a_server_says():
    wants_all = GuildPolicy(guild_id=G, links_allowed=True, streaming_links_allowed=True)
    assert effective_policy(DEFAULTS, wants_all, [], CEILINGS).streaming_links_allowed is True
    no_streaming = replace(CEILINGS, streaming_links_allowed=False)
    policy = effective_policy(DEFAULTS, wants_all, [], no_streaming)
    assert (policy.links_allowed, policy.streaming_links_allowed) == (True, False)
    no_links = replace(CEILINGS, links_allowed=False)
    policy = effective_policy(DEFAULTS, wants_all, [], no_links)
    assert (policy.links_allowed, policy.streaming_links_allowed) == (False, False)


def test_the_ceilings_come_from_the_operators_settings():
    settings = Settings(_env_file=None, ceiling_user_minutes_per_day=90, ceiling_guild_minutes_per_day=900,
                        ceiling_user_concurrent_jobs=2, ceiling_guild_queued_jobs=30, ceiling_total_queued_jobs=70,
                        max_duration_s=600, forbid_streaming_links=True)
    assert ceilings_of(settings) == Ceilings(
        user_minutes_per_day=90.0, guild_minutes_per_day=900.0, user_concurrent_jobs=2, guild_queued_jobs=30,
        max_track_minutes=10.0, total_queued_jobs=70, links_allowed=True, streaming_links_allowed=False)
    plain = Settings(_env_file=None)
    # Out of the box the defaults sit under the ceilings: nothing changes for a server
    # that changed nothing.
    assert effective_policy(default_policy(plain), None, [], ceilings_of(plain)) == default_policy(plain)
    assert (plain.allowed_guild_ids, plain.dms_allowed) == (None, True)
    assert Settings(_env_file=None, allowed_guilds=" 12, 34 ,").allowed_guild_ids == {12, 34}
    with pytest.raises(ValueError, match="server ids as digits"):
        Settings(_env_file=None, allowed_guilds="12,my-server")


async def test_the_quota_book_holds_every_policy_to_the_ceilings(db):
    generous = Policy(user_minutes_per_day=500.0, guild_minutes_per_day=120.0, user_concurrent_jobs=9,
                      guild_queued_jobs=10, max_track_minutes=15.0)
    book = db.store(generous, ceilings=CEILINGS).quotas
    dm = await book.policy(None)
    assert (dm.user_minutes_per_day, dm.user_concurrent_jobs) == (60.0, 3)
    await book.set_guild(G, user_minutes_per_day=1e9, guild_queued_jobs=10**6)
    await book.set_tier(G, 1, user_concurrent_jobs=50)
    member = await book.policy(G, [1])
    assert (member.user_minutes_per_day, member.guild_queued_jobs, member.user_concurrent_jobs) == (60.0, 12, 3)
    assert book.job_limits(member) == {**member.as_limits(), ACROSS_SERVERS: True}


# -- one allowance across servers -----------------------------------------------------------------


async def test_a_member_in_two_servers_and_dms_has_one_days_allowance(db):
    policy = Policy(user_minutes_per_day=10.0, guild_minutes_per_day=1000.0, user_concurrent_jobs=10,
                    guild_queued_jobs=100, max_track_minutes=30.0)
    store = db.store(policy, ceilings=ROOMY_CEILINGS)
    here, there, dm, later = [await admit(store, policy, user_id=1, guild_id=g) for g in (G, G + 1, None, G + 1)]
    await store.reserve(here.id, 7 * 60)
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(there.id, 5 * 60)  # this server's own 10 minutes are untouched
    assert refused.value.reason == ("this track is 5.0 min but your daily allowance has 3.0 min left "
                                    "(counted across every server and DM; resets at 00:00 UTC)")
    await store.reserve(there.id, 2 * 60)
    with pytest.raises(QuotaExceeded):
        await store.reserve(dm.id, 2 * 60)  # DMs count too
    await store.reserve(later.id, 60)

    today = utc_day()
    usage = await db.usage()
    assert usage[(EVERY_SERVER, 1, today)] == (0.0, 600.0)
    assert usage[(G, 1, today)] == (0.0, 420.0) and usage[(G + 1, 1, today)] == (0.0, 180.0)
    assert usage.get((DM, 1, today), (0.0, 0.0)) == (0.0, 0.0)
    # Another member is not touched by it.
    neighbour = await admit(store, policy, user_id=2, guild_id=G)
    await store.reserve(neighbour.id, 10 * 60)
    # /quota shows the counter across servers, wherever it is asked.
    status = await store.quotas.status(G + 1, 1, policy)
    assert (status.user_reserved_s, status.user_left_s, status.user_active) == (600.0, 0.0, 4)


async def test_fifty_concurrent_reservations_in_six_places_never_exceed_one_allowance(wide):
    policy = Policy(user_minutes_per_day=10.0, guild_minutes_per_day=1000.0, user_concurrent_jobs=100,
                    guild_queued_jobs=100, max_track_minutes=30.0)
    plain = wide.store(policy, ceilings=ROOMY_CEILINGS)
    places = [G, G + 1, G + 2, G + 3, G + 4, None]
    jobs = [await admit(plain, policy, user_id=7, guild_id=places[k % 6]) for k in range(50)]
    gate = wide.gate(50)
    store = wide.store(policy, sessions=gate, ceilings=ROOMY_CEILINGS)
    results = await asyncio.gather(*(store.reserve(job.id, 60.0) for job in jobs), return_exceptions=True)
    assert gate.peak == 50

    refused = [result for result in results if result is not None]
    assert sum(result is None for result in results) == 10 and len(refused) == 40
    assert all(isinstance(exc, QuotaExceeded) and "counted across every server" in exc.reason for exc in refused)
    usage = await wide.usage()
    today = utc_day()
    assert usage[(EVERY_SERVER, 7, today)] == (0.0, 600.0)
    assert sum(reserved for (g, u, _), (_, reserved) in usage.items() if u == 7 and g != EVERY_SERVER) == 600.0
    rows = await wide.jobs()
    assert sum(r.quota_state == "reserved" for r in rows) == 10


async def test_fifty_concurrent_admissions_in_five_servers_hold_one_members_jobs_at_once(wide):
    policy = Policy(60.0, 600.0, user_concurrent_jobs=3, guild_queued_jobs=100, max_track_minutes=30.0)
    gate = wide.gate(50)
    store = wide.store(policy, sessions=gate, ceilings=ROOMY_CEILINGS)
    results = await asyncio.gather(*(
        store.admit(policy, **{**FIELDS, "source_name": f"t{k}.mp3"}, user_id=7, guild_id=G + k % 5)
        for k in range(50)))
    assert gate.peak == 50
    admitted = [job for job, _ in results if job is not None]
    assert len(admitted) == 3  # not 3 in each server
    assert {refusal for job, refusal in results if job is None} == {
        "you already have 3 job(s) in progress; wait for one to finish"}
    slots = await wide.slots()
    assert slots[(EVERY_SERVER, 7)] == 3 and slots[(EVERY_SERVER, SERVER)] == 3
    assert sum(n for (g, u), n in slots.items() if u == 7 and g != EVERY_SERVER) == 3
    assert len(await wide.jobs()) == 3


async def test_fifty_concurrent_admissions_fill_the_whole_queue_to_its_ceiling(wide):
    policy = Policy(60.0, 600.0, user_concurrent_jobs=3, guild_queued_jobs=100, max_track_minutes=30.0)
    ceilings = replace(ROOMY_CEILINGS, total_queued_jobs=7)
    gate = wide.gate(50)
    store = wide.store(policy, sessions=gate, ceilings=ceilings)
    results = await asyncio.gather(*(
        store.admit(policy, **FIELDS, user_id=100 + k, guild_id=G + k % 10) for k in range(50)))
    assert gate.peak == 50
    assert sum(job is not None for job, _ in results) == 7
    assert {refusal for job, refusal in results if job is None} == {
        "stembot's queue is full (7 jobs across every server); try again in a few minutes"}
    slots = await wide.slots()
    assert slots[(EVERY_SERVER, SERVER)] == 7
    assert sum(n for (g, u), n in slots.items() if u == SERVER and g != EVERY_SERVER) == 7
    assert len(await wide.jobs()) == 7


# -- charged or released with the job, once ------------------------------------------------------


@pytest.mark.parametrize("end", [JobState.done, JobState.failed, JobState.cancelled])
async def test_the_counters_across_servers_move_with_the_job_exactly_once(db, end):
    store = db.store(ceilings=ROOMY_CEILINGS)
    job = await admit(store, user_id=1, guild_id=G)
    other = await admit(store, user_id=1, guild_id=G + 1)  # holds a slot throughout
    await store.update(job.id, state=JobState.fetching.value)
    await store.reserve(job.id, 120.0)
    await store.reserve(other.id, 30.0)
    if end is JobState.done:
        for state in (JobState.decoding, JobState.separating, JobState.encoding, JobState.delivering):
            assert await store.transition(job.id, state)

    results = await asyncio.gather(*(store.transition(job.id, end) for _ in range(5)),
                                   store.settle_finished(), store.settle_finished())
    assert sum(r is True for r in results[:5]) == 1
    assert await store.settle_finished() == []

    today = utc_day()
    used = 120.0 if end is JobState.done else 0.0
    usage = await db.usage()
    assert usage[(EVERY_SERVER, 1, today)] == (used, 30.0)
    assert usage[(G, 1, today)] == (used, 0.0) and usage[(G, SERVER, today)] == (used, 0.0)
    assert usage[(G + 1, 1, today)] == (0.0, 30.0)
    assert await db.slots() == {(EVERY_SERVER, 1): 1, (EVERY_SERVER, SERVER): 1, (G, 1): 0, (G, SERVER): 0,
                                (G + 1, 1): 1, (G + 1, SERVER): 1}


async def test_a_job_admitted_before_the_ceilings_gives_back_only_what_it_took(db):
    """A job queued by a bot without ceilings (before the upgrade) ends under one with
    them: it never took the counters across servers, so it must not give them back."""
    old = db.store()
    job = await admit(old, user_id=1, guild_id=G)
    await old.reserve(job.id, 60.0)
    assert ACROSS_SERVERS not in (await old.get(job.id)).limits
    new = db.store(ceilings=ROOMY_CEILINGS)
    fresh = await admit(new, user_id=1, guild_id=G + 1)
    await new.reserve(fresh.id, 45.0)

    assert await new.transition(job.id, JobState.failed)
    today = utc_day()
    usage = await db.usage()
    assert usage[(EVERY_SERVER, 1, today)] == (0.0, 45.0)  # the new job's, untouched
    assert usage[(G, 1, today)] == (0.0, 0.0)
    slots = await db.slots()
    assert (slots[(EVERY_SERVER, 1)], slots[(EVERY_SERVER, SERVER)], slots[(G, 1)]) == (1, 1, 0)


async def test_reconcile_recounts_the_counters_across_servers(db):
    store = db.store(ceilings=ROOMY_CEILINGS)
    await admit(store, user_id=1, guild_id=G)
    await admit(store, user_id=1, guild_id=G + 1)
    await admit(store, user_id=2, guild_id=None)
    ended = await admit(store, user_id=2, guild_id=G)
    assert await store.transition(ended.id, JobState.failed)
    await admit(db.store(), user_id=1, guild_id=G)  # from before the upgrade: not counted across
    correct = await db.slots()
    assert {key: n for key, n in correct.items() if key[0] == EVERY_SERVER} == {
        (EVERY_SERVER, 1): 2, (EVERY_SERVER, 2): 1, (EVERY_SERVER, SERVER): 3}

    await store.reconcile_slots()
    assert await db.slots() == correct
    await db.sql("UPDATE quota_slots SET active = 40 WHERE guild_id = :g", g=EVERY_SERVER)
    await db.sql("DELETE FROM quota_slots WHERE guild_id = :g AND user_id = 2", g=EVERY_SERVER)
    await store.reconcile_slots()
    assert await db.slots() == correct


async def test_admissions_endings_and_reconcile_lock_the_counters_in_one_order(db):
    """An admission that holds its first counter (the member's across servers) while a
    sweep settles jobs and recounts: on PostgreSQL any other order deadlocks."""
    store = db.store(ceilings=ROOMY_CEILINGS)
    first, second = await admit(store, user_id=1), await admit(store, user_id=2, guild_id=G + 1)
    for job in (first, second):
        await db.sql("UPDATE jobs SET state = 'failed' WHERE id = :id", id=job.id)
    started: list[asyncio.Task] = []

    async def sweep():
        sweeper = db.store(ceilings=ROOMY_CEILINGS)
        await sweeper.settle_finished()
        await sweeper.reconcile_slots()

    class PauseAfterFirstSlot(AsyncSession):
        async def execute(self, statement, *args, **kwargs):
            result = await super().execute(statement, *args, **kwargs)
            if str(statement).startswith("UPDATE quota_slots") and "active <" in str(statement) and not started:
                started.append(asyncio.create_task(sweep()))
                await asyncio.sleep(0.5)
            return result

    engine = make_engine(db.url)
    try:
        paused = db.store(sessions=async_sessionmaker(engine, class_=PauseAfterFirstSlot, expire_on_commit=False),
                          ceilings=ROOMY_CEILINGS)
        await admit(paused, user_id=2)
        await asyncio.wait_for(started[0], 30)
    finally:
        await engine.dispose()
    slots = await db.slots()
    assert (slots[(EVERY_SERVER, 1)], slots[(EVERY_SERVER, 2)], slots[(EVERY_SERVER, SERVER)]) == (0, 1, 1)
    assert (slots[(G, 2)], slots[(G, SERVER)], slots[(G + 1, 2)]) == (1, 1, 0)
