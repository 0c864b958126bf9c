"""The bot's side of distributed mode on a real PostgreSQL and queue: jobs reach the
queue in priority and fair order, and never more than the ready worker slots take."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest_asyncio
from procrastinate.jobs import Status

from core.db import make_engine, make_sessions
from core.distributed.fleet import Fleet
from core.distributed.queue import QUEUE, JobQueue
from core.distributed.queue_execution import QueueExecution
from core.distributed.queue_schema import install_schema
from core.jobs.dispatcher import Dispatcher, DispatcherConfig
from core.jobs.job import JobState
from core.jobs.results import stem_bytes_cap, with_tolerance
from core.jobs.store import JobStore
from core.jobs.uploads import TransferWindow
from core.media.audio import Limits, OutputFormat
from core.storage.local import LocalStorage
from core.storage.s3_client import S3Client
from core.storage.s3_storage import S3Storage
from tests.support.media import music
from tests.support.s3_policy import expires_at, signed_policy
from tests.support.silent_notifier import Silent


@pytest_asyncio.fixture
async def setup(migrated, tmp_path):
    await install_schema(migrated)
    engine = make_engine(migrated)
    sessions = make_sessions(engine)
    store, fleet, queue = JobStore(sessions), Fleet(sessions), JobQueue(migrated)
    await queue.open()
    storage = LocalStorage(tmp_path / "jobs")
    song = music(tmp_path / "song.wav", seconds=2.0)
    yield store, fleet, queue, storage, song
    await queue.close()
    await engine.dispose()


async def add_job(store, storage, song, guild: int, user: int, priority: int = 0) -> int:
    job = await store.create(guild_id=guild, user_id=user, priority=priority, source_kind="attachment",
                             source_url="https://cdn.invalid/x", source_name=f"g{guild}u{user}.wav",
                             model="tiny", stems="all", format="mp3")
    path = storage.input_path(job.id, job.source_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(song.read_bytes())  # already fetched
    return job.id


async def next_run(queue: JobQueue, worker_id: int, within_s: float = 10.0):
    """Play a worker: wait for the next queue job and take it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        job = await queue.app.job_manager.fetch_job(queues=[QUEUE], worker_id=worker_id)
        if job is not None:
            return job
        await asyncio.sleep(0.05)
    raise TimeoutError("no job reached the queue")


async def test_jobs_reach_the_queue_in_fair_order_one_per_ready_slot(setup):
    store, fleet, queue, storage, song = setup
    await fleet.beat("w/cpu", host="h", pid=1, device="cpu", model="tiny", state="ready", job_id=None)
    bulk = await add_job(store, storage, song, guild=3, user=30, priority=10)  # a challenge track, oldest
    flood = [await add_job(store, storage, song, guild=1, user=10) for _ in range(3)]
    dispatcher = Dispatcher(store, storage, Silent(), QueueExecution(queue, fleet, prefetch=0),
                            DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    worker = await queue.app.job_manager.register_worker()
    order = []
    try:
        first = await next_run(queue, worker)
        order.append(first.task_kwargs["job_id"])
        # A member of another server asks while the flood waits: they go next.
        late = await add_job(store, storage, song, guild=2, user=20)
        dispatcher.wake()
        running = first
        for _ in range(4):
            await asyncio.sleep(0.5)
            assert await queue.in_flight() == 1, "one ready slot: one job in the queue at a time"
            await queue.app.job_manager.finish_job(running, status=Status.SUCCEEDED, delete_job=False)
            await store.request_cancel(running.task_kwargs["job_id"])  # the run ended
            running = await next_run(queue, worker)
            order.append(running.task_kwargs["job_id"])
    finally:
        await dispatcher.stop()
    assert order == [flood[0], late, flood[1], flood[2], bulk]


async def test_no_ready_slot_no_handover(setup):
    store, fleet, queue, storage, song = setup
    await fleet.beat("w/cpu", host="h", pid=1, device="cpu", model="tiny", state="draining", job_id=None)
    job_id = await add_job(store, storage, song, guild=1, user=1)
    dispatcher = Dispatcher(store, storage, Silent(), QueueExecution(queue, fleet),
                            DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    try:
        await asyncio.sleep(1.5)
        assert await queue.in_flight() == 0
        assert (await store.get(job_id)).state == "queued"
        await fleet.beat("w/cpu", state="ready")
        dispatcher.wake()
        for _ in range(100):
            # The queue's id reaches the row just after the queue has the job.
            if await queue.in_flight() and (await store.get(job_id)).queue_job_id is not None:
                break
            await asyncio.sleep(0.1)
        assert await queue.in_flight() == 1
        handed = await store.get(job_id)
        assert handed.state == "fetching" and handed.queue_job_id is not None and handed.transfer is None
    finally:
        await dispatcher.stop()


async def test_a_slot_that_batches_gets_as_many_jobs_as_it_takes(setup):
    store, fleet, queue, storage, song = setup
    await fleet.beat("w/cuda:0", host="h", pid=1, device="cuda:0", model="tiny", state="ready", job_id=None,
                     capacity=3)
    assert await fleet.ready_slots() == 3
    jobs = [await add_job(store, storage, song, guild=1, user=k) for k in range(5)]
    dispatcher = Dispatcher(store, storage, Silent(), QueueExecution(queue, fleet, prefetch=0),
                            DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    try:
        for _ in range(100):
            if await queue.in_flight() >= 3:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # and no more than that
        assert await queue.in_flight() == 3
        states = [(await store.get(job)).state for job in jobs]
        assert states.count("queued") == 2
    finally:
        await dispatcher.stop()


class StorageFailingFor(LocalStorage):
    """The bot's disk, failing to publish one job's input (a bug or a broken store)."""

    def __init__(self, root, job_id: int):
        super().__init__(root)
        self.job_id = job_id

    async def publish_input(self, job, uploads, ttl_s):
        if job.id == self.job_id:
            raise OSError("the store refused the upload")
        return await super().publish_input(job, uploads, ttl_s)


async def test_a_job_that_cannot_be_handed_over_fails_and_the_next_one_goes_on(setup):
    store, fleet, queue, storage, song = setup
    await fleet.beat("w/cpu", host="h", pid=1, device="cpu", model="tiny", state="ready", job_id=None)
    broken = await add_job(store, storage, song, guild=1, user=1)
    fine = await add_job(store, storage, song, guild=2, user=2)
    dispatcher = Dispatcher(store, StorageFailingFor(storage.root, broken), Silent(),
                            QueueExecution(queue, fleet, prefetch=0), DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    try:
        worker = await queue.app.job_manager.register_worker()
        handed = await next_run(queue, worker)
    finally:
        await dispatcher.stop()
    assert handed.task_kwargs["job_id"] == fine
    failed = await store.get(broken)
    assert failed.state == "failed" and failed.error_kind == "internal"
    assert failed.error == "something went wrong on our side; please try again"


class Ended(Silent):
    def __init__(self):
        self.ended = []

    async def job_ended(self, job):
        self.ended.append((job.id, job.quota_state, job.slot_state))


async def test_the_bot_keeps_the_quotas_of_the_jobs_workers_run(setup):
    """A worker's role has no right on the quota tables, so its store has no QuotaBook: the
    bot reserves the minutes of a track whose length a worker found by decoding it (refused:
    the job fails), and settles a job a worker ended before it reports the end."""
    from core.jobs.quotas import Policy, QuotaBook, QuotaExceeded

    unbooked, fleet, queue, storage, song = setup
    policy = Policy(user_minutes_per_day=1, guild_minutes_per_day=600, user_concurrent_jobs=5, guild_queued_jobs=20,
                    max_track_minutes=20)
    bot, worker = JobStore(unbooked.sessions, QuotaBook(unbooked.sessions, policy)), JobStore(unbooked.sessions)
    leases = {}
    for name in ("fits", "too_much", "crashes"):
        job, _ = await bot.admit(policy, user_id=5, guild_id=1, source_kind="attachment", source_url="u",
                                 source_name=f"{name}.wav", model="tiny", stems="all", format="mp3")
        assert (await bot.claim_next("bot")).id == job.id
        await bot.update(job.id, transfer={"input_url": "https://s3.example/in?X-Amz-Signature=s"})
        leases[name] = (job.id, (await worker.take(job.id, "w/cpu"))[1])
    notifier = Ended()
    dispatcher = Dispatcher(bot, storage, notifier, QueueExecution(queue, fleet, watch_interval_s=0.1),
                            DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    try:
        fits, too_much, crashes = leases["fits"], leases["too_much"], leases["crashes"]
        assert await worker.transition(fits[0], JobState.separating, lease=fits[1], duration_s=40.0)
        for _ in range(50):
            if (await bot.get(fits[0])).quota_state == "reserved":
                break
            await asyncio.sleep(0.1)
        assert (await bot.get(fits[0])).reserved_s == 40.0
        # 40 s reserved, 40 s more is over the member's minute: the job fails, uncharged.
        assert await worker.transition(too_much[0], JobState.separating, lease=too_much[1], duration_s=40.0)
        assert await worker.transition(crashes[0], JobState.failed, lease=crashes[1], error="boom", error_kind="x")
        for _ in range(50):
            if len(notifier.ended) == 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await dispatcher.stop()
    refused = await bot.get(too_much[0])
    assert (refused.state, refused.error_kind, refused.quota_state) == ("failed", QuotaExceeded.kind, "none")
    assert not await worker.transition(too_much[0], JobState.encoding, lease=too_much[1])  # its worker stops
    ended = await bot.get(crashes[0])
    assert (ended.slot_state, ended.transfer) == ("released", None)
    assert sorted(notifier.ended) == sorted([(too_much[0], "none", "released"), (crashes[0], "none", "released")])

async def test_a_handed_over_job_may_upload_only_its_own_files_until_its_run_ends(setup, s3_server):
    """With an object store the row carries one POST per file the job can make, for its
    exact key, capped by the track's length, and valid for the run's window, not the day."""
    store, fleet, queue, local, song = setup
    storage = S3Storage(local.root, S3Client(dataclasses.replace(s3_server, prefix=f"q-{uuid.uuid4().hex[:8]}/")),
                        max_transfer_ttl_s=24 * 3600)
    await storage.start()
    await fleet.beat("w/cpu", host="h", pid=1, device="cpu", model="tiny", state="ready", job_id=None)
    job_id = await add_job(store, storage, song, guild=1, user=1)
    await store.update(job_id, stems="karaoke", format="wav", reserved_s=2.0)  # as measured at admission
    window = TransferWindow(seconds_per_audio_s=3.0, margin_s=600.0)
    dispatcher = Dispatcher(store, storage, Silent(), QueueExecution(queue, fleet, prefetch=0, window=window),
                            DispatcherConfig(worker_name="bot", limits=Limits(max_duration_s=300.0), max_attempts=2))
    before = time.time()
    await dispatcher.start()
    try:
        worker = await queue.app.job_manager.register_worker()
        await next_run(queue, worker)
        transfer = (await store.get(job_id)).transfer
    finally:
        await dispatcher.stop()
        await storage.close()
    posts = transfer["stems_posts"]
    assert set(posts) == {"vocals.wav", "no_vocals.wav", "preview.png"}
    cap = stem_bytes_cap(OutputFormat(name="wav"), with_tolerance(2.0))
    # 600 s + 3 x (a 300-s track ahead + 2 attempts x 2 s)
    lasts = 600.0 + 3.0 * (300.0 + 2 * 2.0)
    for name, post in posts.items():
        policy = signed_policy(post["fields"])
        key = storage.store.stems_prefix(job_id) + name
        assert {"key": key} in policy["conditions"]
        limit = 4 * 1024 * 1024 if name == "preview.png" else cap
        assert ["content-length-range", 1, limit] in policy["conditions"]
        assert before + lasts - 2 <= expires_at(policy) <= time.time() + lasts + 1
    assert cap < 2 * 1024 * 1024  # two seconds of audio, not a gigabyte


async def test_a_job_the_operator_fails_is_reported_by_the_running_bot(setup, tmp_path):
    """`stembot jobs fail` in distributed mode, while the bot runs: the bot's watcher sees the
    end and reports it, the worker's queue job is aborted, and the run's lease is dead."""
    import os
    import sys

    from core.jobs.quotas import Policy, QuotaBook

    unbooked, fleet, queue, storage, song = setup
    policy = Policy(user_minutes_per_day=60, guild_minutes_per_day=600, user_concurrent_jobs=5,
                    guild_queued_jobs=20, max_track_minutes=20)
    bot, worker = JobStore(unbooked.sessions, QuotaBook(unbooked.sessions, policy)), JobStore(unbooked.sessions)
    job, _ = await bot.admit(policy, user_id=5, guild_id=1, source_kind="attachment", source_url="u",
                             source_name="a.wav", model="tiny", stems="all", format="mp3")
    assert (await bot.claim_next("bot")).id == job.id
    queue_job_id = await queue.enqueue(job.id, 0)
    await bot.update(job.id, queue_job_id=queue_job_id)
    await next_run(queue, await queue.app.job_manager.register_worker())  # a worker runs it
    _, lease = await worker.take(job.id, "w/cpu")
    notifier = Ended()
    dispatcher = Dispatcher(bot, storage, notifier, QueueExecution(queue, fleet, watch_interval_s=0.1),
                            DispatcherConfig(worker_name="bot"))
    await dispatcher.start()
    try:
        await asyncio.sleep(0.3)  # the watcher has seen it running
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEMBOT_")}
        env.update(STEMBOT_QUEUE="postgres", STEMBOT_DATABASE_URL=unbooked.sessions.kw["bind"].url
                   .render_as_string(hide_password=False), STEMBOT_DATA_DIR=str(tmp_path / "data"))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stembot", "jobs", "fail", str(job.id), "--reason", "bad track", env=env,
            cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        assert "a running bot tells the user" in out.decode()
        for _ in range(50):
            if notifier.ended:
                break
            await asyncio.sleep(0.1)
    finally:
        await dispatcher.stop()
    assert notifier.ended == [(job.id, "none", "released")]  # no minutes reserved yet; its slot freed
    assert not await worker.update(job.id, lease=lease, progress=0.5)
    assert queue_job_id in await queue.app.job_manager.list_jobs_to_abort_async()  # its worker stops
