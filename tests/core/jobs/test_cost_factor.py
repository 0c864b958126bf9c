"""Minutes that follow cost: a job reserves and is charged its track's minutes times its
cost factor (`jobs.cost_factor`), on a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import pytest

from core.jobs.job import JobState
from core.jobs.quotas import SERVER, Policy, QuotaExceeded, utc_day
from core.separation.published import FAMILY_COST_FACTOR, cost_factor_of
from tests.support.quota_db import admit

G = 5


async def _run_to_delivery(store, job_id: int) -> None:
    claimed = await store.claim_next("w")
    assert claimed is not None and claimed.id == job_id


async def _deliver(store, job_id: int) -> None:
    for state in (JobState.decoding, JobState.separating, JobState.encoding, JobState.delivering, JobState.done):
        assert await store.transition(job_id, state)


async def test_a_costly_job_reserves_and_is_charged_its_minutes_times_its_factor(db):
    store = db.store()
    job = await admit(store, cost_factor=2.5)
    await _run_to_delivery(store, job.id)
    await store.reserve(job.id, 120.0)
    today = utc_day()
    assert (await db.usage())[(G, 1, today)] == (0.0, 300.0)
    assert (await db.usage())[(G, SERVER, today)] == (0.0, 300.0)
    row = await store.get(job.id)
    # The row keeps the track's own length: the results check compares the stems with it.
    assert (row.reserved_s, row.cost_factor) == (120.0, 2.5)
    await _deliver(store, job.id)
    assert await db.usage() == {(G, 1, today): (300.0, 0.0), (G, SERVER, today): (300.0, 0.0)}


async def test_a_failed_costly_job_gives_back_all_it_reserved(db):
    store = db.store()
    job = await admit(store, cost_factor=3.0)
    await _run_to_delivery(store, job.id)
    await store.reserve(job.id, 60.0)
    assert (await db.usage())[(G, 1, utc_day())] == (0.0, 180.0)
    assert await store.transition(job.id, JobState.failed, error="boom")
    assert await db.usage() == {(G, 1, utc_day()): (0.0, 0.0), (G, SERVER, utc_day()): (0.0, 0.0)}


async def test_a_job_without_a_factor_costs_its_minutes(db):
    store = db.store()
    job = await admit(store)
    await _run_to_delivery(store, job.id)
    await store.reserve(job.id, 90.0)
    await _deliver(store, job.id)
    assert (await db.usage())[(G, 1, utc_day())] == (90.0, 0.0)


async def test_the_refusal_says_what_the_track_costs_at_its_factor(db):
    policy = Policy(10.0, 1000.0, 10, 100, 30.0)
    store = db.store(policy)
    job = await admit(store, policy, cost_factor=2.5)
    await _run_to_delivery(store, job.id)
    with pytest.raises(QuotaExceeded) as refused:
        await store.reserve(job.id, 5 * 60)  # 12.5 min at 2.5x, of 10
    assert refused.value.reason == ("this track costs 12.5 min (5.0 min at 2.5x for its model) but your daily "
                                    "allowance has 10.0 min left (resets at 00:00 UTC)")
    assert await db.usage() in ({}, {(G, 1, utc_day()): (0.0, 0.0), (G, SERVER, utc_day()): (0.0, 0.0)})
    await store.reserve(job.id, 4 * 60)  # 10 min at 2.5x: exactly what is left fits
    assert (await db.usage())[(G, 1, utc_day())] == (0.0, 600.0)


def test_unlisted_models_cost_their_familys_factor():
    assert cost_factor_of("htdemucs", "demucs") == 1.0
    assert cost_factor_of("someones_bs_roformer", "bs_roformer") == FAMILY_COST_FACTOR["bs_roformer"] > 1
