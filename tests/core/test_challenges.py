"""core.challenges: the rules of remix challenges on a real SQLite file and a real
PostgreSQL server (the `database_url` fixture): states, entries, votes, tally, deadlines."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
import pytest_asyncio

from core.challenges import (
    ChallengeState,
    ChallengeStore,
    Closed,
    OwnEntry,
    TooManySubmissions,
    UnknownEntry,
    parse_duration,
    submissions,
)
from core.db import make_engine, make_sessions, utcnow
from core.jobs.job import JobState
from core.jobs.store import JobStore

T0 = utcnow().replace(microsecond=0)
SUBMIT = T0 + timedelta(hours=1)
VOTE = T0 + timedelta(hours=2)
HOST, ANN, BOB, CAT, DAN = 1, 2, 3, 4, 5
JOB_FIELDS = dict(user_id=HOST, guild_id=9, source_kind="attachment", source_url="https://cdn.example/t.wav",
                  source_name="t.wav", model="tiny", stems="all", format="mp3", priority=10)


@pytest_asyncio.fixture
async def stores(database_url):
    engine = make_engine(database_url)
    sessions = make_sessions(engine)
    yield ChallengeStore(sessions), JobStore(sessions)
    await engine.dispose()


@pytest.fixture
def store(stores):
    return stores[0]


async def new(store: ChallengeStore, state: ChallengeState = ChallengeState.open, **fields):
    challenge = await store.create(guild_id=9, channel_id=7, thread_id=8, host_id=HOST, title="Remix me",
                                   rules="be kind", submit_deadline=SUBMIT, vote_deadline=VOTE, **fields)
    if state is not ChallengeState.splitting:
        assert await store.transition(challenge.id, ChallengeState.open)
    return challenge


async def submit(store, challenge, user, minutes, name="remix.wav"):
    return await store.submit_entry(challenge.id, user, file_path=f"challenges/{challenge.id}/entries/{user}.wav",
                                    original_name=name, duration_s=30.0, size_bytes=1000,
                                    now=T0 + timedelta(minutes=minutes))


async def voting(store, challenge, rng=None):
    return await store.open_voting(challenge.id, now=SUBMIT, rng=rng)


def during_vote(minutes=1):
    return SUBMIT + timedelta(minutes=minutes)


# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [("2d", 172800), ("36h", 129600), ("90m", 5400), ("20s", 20),
                                           ("1d12h", 129600), (" 1h 30m ", 5400), ("1.5h", 5400), ("1W", 604800)])
def test_durations(text, seconds):
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text, message", [("soon", "can't read"), ("5", "can't read"), ("2d and", "can't read"),
                                           ("", "can't read"), ("5s", "too short"), ("91d", "too long")])
def test_bad_durations(text, message):
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


# -- states --------------------------------------------------------------------------------------


async def test_state_machine_moves_only_along_its_edges(store):
    challenge = await new(store, ChallengeState.splitting)
    assert challenge.state == "splitting" and challenge.next_deadline is None
    assert not await store.transition(challenge.id, ChallengeState.voting)
    assert not await store.transition(challenge.id, ChallengeState.closed)
    assert await store.transition(challenge.id, ChallengeState.open)
    assert not await store.transition(challenge.id, ChallengeState.open), "a move happens once"
    assert (await store.get(challenge.id)).next_deadline == SUBMIT
    assert await store.open_voting(challenge.id, now=SUBMIT - timedelta(seconds=1)) is None, "not before the deadline"
    assert await voting(store, challenge) == []
    assert (await store.get(challenge.id)).next_deadline == VOTE
    assert await store.transition(challenge.id, ChallengeState.closed, result_message_id=0)
    assert not await store.transition(challenge.id, ChallengeState.cancelled), "an ended challenge stays ended"
    ended = await store.get(challenge.id)
    assert ended.challenge_state is ChallengeState.closed and ended.ended_at is not None

    other = await new(store)
    assert await store.transition(other.id, ChallengeState.cancelled, ended_by=HOST, end_reason="ended by the host")
    assert not await store.transition(other.id, ChallengeState.voting)
    assert [c.id for c in await store.for_guild(9)] == [other.id, challenge.id]
    assert [c.id for c in await store.for_guild(9, states=[ChallengeState.closed])] == [challenge.id]
    assert (await store.in_thread(8)).id == other.id


async def test_only_one_of_two_schedulers_opens_the_vote(store):
    challenge = await new(store)
    for user in (ANN, BOB):
        await submit(store, challenge, user, 5)
    results = await asyncio.gather(*(voting(store, challenge) for _ in range(4)))
    assert sorted(r is not None for r in results) == [False, False, False, True]
    assert await store.claim_entry_post((await store.entries(challenge.id))[0].id)
    entry_id = (await store.entries(challenge.id))[0].id
    assert not await store.claim_entry_post(entry_id), "a voting post is claimed once"


# -- entries -------------------------------------------------------------------------------------


async def test_one_entry_per_member_replaceable_until_the_deadline(store):
    challenge = await new(store)
    first = await submit(store, challenge, ANN, 5, "take1.wav")
    assert not first.replaced and first.old_path is None
    again = await store.submit_entry(challenge.id, ANN, file_path=f"challenges/{challenge.id}/entries/{ANN}.mp3",
                                     original_name="take2.mp3", duration_s=31.0, now=T0 + timedelta(minutes=20))
    assert again.replaced and again.old_path == first.entry.file_path and again.entry.id == first.entry.id
    same_path = await submit(store, challenge, ANN, 25, "take3.wav")
    assert same_path.replaced and same_path.old_path is not None  # .mp3 -> .wav: the .mp3 goes
    await submit(store, challenge, BOB, 10)
    entries = await store.entries(challenge.id)
    assert [(e.user_id, e.original_name, e.replaced) for e in entries] == [(BOB, "remix.wav", 0),
                                                                           (ANN, "take3.wav", 2)]
    assert (await store.entry_of(challenge.id, ANN)).submitted_at == T0 + timedelta(minutes=25)
    assert await store.count_entries(challenge.id) == 2

    with pytest.raises(Closed, match="submissions are closed"):
        await submit(store, challenge, CAT, 60)  # exactly at the deadline: late
    assert await store.entry_of(challenge.id, CAT) is None
    with pytest.raises(Closed):
        await submit(store, challenge, ANN, 61, "too-late.wav")
    assert (await store.entry_of(challenge.id, ANN)).original_name == "take3.wav"


async def test_a_member_has_a_capped_number_of_submissions_even_at_once(store):
    challenge = await new(store)

    async def send(minute: int, name: str):
        return await store.submit_entry(challenge.id, ANN, file_path=f"challenges/{challenge.id}/entries/{ANN}.wav",
                                        original_name=name, now=T0 + timedelta(minutes=minute), max_submissions=3)

    await send(1, "one.wav")
    # Ten at once where two are left: two get in, eight are refused, counted under the lock.
    results = await asyncio.gather(*(send(2, f"at-once-{k}.wav") for k in range(10)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 8 and all(isinstance(r, TooManySubmissions) for r in refused), refused
    assert refused[0].reason == "you have sent 3 entries to this challenge, the most allowed; your current entry stays"
    entry = await store.entry_of(challenge.id, ANN)
    assert entry.replaced == 2 and entry.original_name.startswith("at-once-") and submissions(entry) == 3
    assert submissions(None) == 0
    await submit(store, challenge, BOB, 3)  # another member's count is their own


async def test_no_submissions_while_splitting_or_voting(store):
    challenge = await new(store, ChallengeState.splitting)
    with pytest.raises(Closed):
        await submit(store, challenge, ANN, 1)
    assert await store.transition(challenge.id, ChallengeState.open)
    await submit(store, challenge, ANN, 1)
    assert await voting(store, challenge)
    with pytest.raises(Closed):
        await store.submit_entry(challenge.id, BOB, file_path="x", original_name="x.wav", now=T0)


async def test_voting_numbers_entries_in_submission_order_or_shuffled_when_anonymous(store):
    plain = await new(store)
    for minutes, user in enumerate((CAT, ANN, BOB, DAN), start=1):
        await submit(store, plain, user, minutes)
    numbered = await voting(store, plain)
    assert [(e.position, e.user_id) for e in numbered] == [(1, CAT), (2, ANN), (3, BOB), (4, DAN)]
    assert [e.user_id for e in await store.entries(plain.id)] == [CAT, ANN, BOB, DAN]

    secret = await new(store, anonymous=True)
    for minutes, user in enumerate((CAT, ANN, BOB, DAN), start=1):
        await submit(store, secret, user, minutes)
    order = [CAT, ANN, BOB, DAN]
    random.Random(3).shuffle(order)
    assert order != [CAT, ANN, BOB, DAN]
    numbered = await voting(store, secret, rng=random.Random(3))
    assert [e.user_id for e in numbered] == order
    assert [(e.position, e.user_id) for e in await store.entries(secret.id)] == list(enumerate(order, start=1))


# -- votes ---------------------------------------------------------------------------------------


async def test_vote_rules(store):
    challenge = await new(store)
    ann = (await submit(store, challenge, ANN, 1)).entry
    bob = (await submit(store, challenge, BOB, 2)).entry
    with pytest.raises(Closed, match="voting is closed"):
        await store.vote(CAT, ann.id, now=T0 + timedelta(minutes=3))  # submissions still open
    await voting(store, challenge)

    with pytest.raises(OwnEntry, match="your own entry"):
        await store.vote(ANN, ann.id, now=during_vote())
    first = await store.vote(CAT, ann.id, now=during_vote())
    assert first.previous_entry_id is None and first.entry.id == ann.id
    same = await store.vote(CAT, ann.id, now=during_vote(2))
    assert same.unchanged and same.previous_entry_id == ann.id
    changed = await store.vote(CAT, bob.id, now=during_vote(3))
    assert changed.previous_entry_id == ann.id and not changed.unchanged
    await store.vote(ANN, bob.id, now=during_vote(4))
    assert await store.count_votes(challenge.id) == 2, "a changed vote counts once"
    assert (await store.vote_of(challenge.id, CAT)).entry_id == bob.id
    assert [(s.entry.user_id, s.votes) for s in await store.tally(challenge.id)] == [(BOB, 2), (ANN, 0)]

    with pytest.raises(UnknownEntry):
        await store.vote(CAT, 999999, now=during_vote())
    with pytest.raises(Closed):
        await store.vote(DAN, ann.id, now=VOTE)  # at the deadline: too late, even before the scheduler acts
    assert await store.transition(challenge.id, ChallengeState.closed)
    with pytest.raises(Closed):
        await store.vote(DAN, ann.id, now=during_vote())
    assert await store.count_votes(challenge.id) == 2


async def test_a_members_votes_at_once_leave_one_vote(store):
    challenge = await new(store)
    entries = [(await submit(store, challenge, user, n)).entry for n, user in enumerate((ANN, BOB, CAT), start=1)]
    await voting(store, challenge)
    await asyncio.gather(*(store.vote(DAN, entries[i % 3].id, now=during_vote()) for i in range(6)))
    assert await store.count_votes(challenge.id) == 1
    assert sum(s.votes for s in await store.tally(challenge.id)) == 1


async def test_tally_ranks_by_votes_then_earliest_submission(store):
    challenge = await new(store)
    late = (await submit(store, challenge, ANN, 30)).entry
    early = (await submit(store, challenge, BOB, 10)).entry
    top = (await submit(store, challenge, CAT, 20)).entry
    none = (await submit(store, challenge, DAN, 5)).entry
    await voting(store, challenge)
    for voter, entry in ((ANN, top), (BOB, top), (HOST, late), (DAN, early), (100, top)):
        await store.vote(voter, entry.id, now=during_vote())
    standings = await store.tally(challenge.id)
    assert [(s.rank, s.entry.id, s.votes) for s in standings] == [
        (1, top.id, 3), (2, early.id, 1), (3, late.id, 1), (4, none.id, 0)]


# -- deadlines -------------------------------------------------------------------------------------


async def test_due_lists_what_needs_doing(stores):
    store, jobs = stores
    job = await jobs.create(**JOB_FIELDS)
    splitting = await new(store, ChallengeState.splitting, job_id=job.id)
    orphan = await new(store, ChallengeState.splitting)  # its job never got queued
    opened = await new(store)
    voted = await new(store)
    await submit(store, voted, ANN, 1)
    await voting(store, voted)

    def ids(challenges):
        return [c.id for c in challenges]

    before = T0 + timedelta(minutes=5)
    assert ids(await store.due(before)) == [voted.id], "voting posts not made yet"
    entry = (await store.entries(voted.id))[0]
    assert await store.claim_entry_post(entry.id)
    await store.set_entry_message(entry.id, 12345)
    assert ids(await store.due(before)) == []
    assert await store.next_deadline() == SUBMIT

    await jobs.transition(job.id, JobState.failed, error="nope")
    assert ids(await store.due(before)) == [splitting.id]
    assert ids(await store.due(utcnow() + timedelta(minutes=11))) == [splitting.id, orphan.id]
    assert ids(await store.due(SUBMIT)) == [splitting.id, orphan.id, opened.id]
    assert ids(await store.due(VOTE)) == [splitting.id, orphan.id, opened.id, voted.id]

    for challenge in (splitting, orphan, opened, voted):
        await store.transition(challenge.id, ChallengeState.cancelled)
    assert await store.due(VOTE + timedelta(days=30)) == []
    assert await store.next_deadline() is None
